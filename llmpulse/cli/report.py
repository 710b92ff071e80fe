"""`llmpulse report --since 24h --by model|app|user|key`: a period against the one before."""

from __future__ import annotations

import argparse
import sys

from llmpulse.cli import settings_of


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "report",
        help="requests, errors, latency, TTFT, tokens, cost and alerts by model, app, user or key",
        description="Summarise a period by model, app, user or API key (its keyed hash): requests, error "
        "rate, p95 latency, p95 time to first token, tokens and cost, each compared with the period "
        "before; the top error types and the alerts that fired.",
    )
    p.add_argument("--since", default="24h", help="the period, ending now (or --until): 90m, 24h, 7d (default 24h)")
    p.add_argument("--until", default=None, help="end of the period: ISO 8601 or 'now' (default now)")
    p.add_argument("--by", choices=["model", "app", "user", "key"], default="model")
    p.add_argument("--top", type=int, default=20, help="groups shown, the busiest first (default 20)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from llmpulse.analysis.client import query
    from llmpulse.analysis.panels import parse_duration, parse_time
    from llmpulse.analysis.report import build_report, format_report
    from llmpulse.errors import LLMPulseError

    settings = settings_of(args)
    if args.top < 1:
        raise LLMPulseError("--top must be at least 1")
    since = parse_duration(args.since)
    end = parse_time(args.until) if args.until else None
    from llmpulse.streams.rules import SloRule, load_rules

    slos = [r for r in load_rules(settings.rules_file, None).rules if isinstance(r, SloRule)]
    rep = build_report(lambda sql: query(settings, sql), settings.clickhouse.database, args.by, since, end, args.top,
                       slos)  # fmt: skip
    if args.format == "json":
        sys.stdout.write(rep.model_dump_json(indent=2) + "\n")
    else:
        sys.stdout.write(format_report(rep) + "\n")
    return 0
