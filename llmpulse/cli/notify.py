"""`llmpulse notify`: deliver alerts to Slack, webhooks and the log."""

from __future__ import annotations

import argparse

from llmpulse.cli import settings_of


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "notify",
        help="deliver alerts to Slack, webhooks and the log (grouped, silenced, once each)",
        description="Consume the alerts topic and notify the receivers of `notify.routes`, "
        "grouped in the manner of Alertmanager (group_wait, group_interval, repeat_interval), "
        "with silences, inhibition, retries and a delivery log that survives restarts. "
        "Secrets come from the environment variables the receivers name.",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from llmpulse.sinks.notifier import run_notifier
    from llmpulse.web_metrics import serve_metrics

    settings = settings_of(args)
    serve_metrics(settings.notify.web_port)
    run_notifier(settings)
    return 0
