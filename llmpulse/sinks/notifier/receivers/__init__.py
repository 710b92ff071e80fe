"""Where notifications go: Slack, a signed webhook, the log."""

from __future__ import annotations

from collections.abc import Mapping

from llmpulse.config.notify import (
    LogReceiverConfig,
    NotifyConfig,
    SlackReceiverConfig,
    WebhookReceiverConfig,
)
from llmpulse.sinks.notifier.receivers.base import DeliveryError, Receiver
from llmpulse.sinks.notifier.receivers.log import LogReceiver
from llmpulse.sinks.notifier.receivers.slack import SlackReceiver
from llmpulse.sinks.notifier.receivers.webhook import WebhookReceiver, sign, verify_signature


def build_receivers(cfg: NotifyConfig, environ: Mapping[str, str] | None = None) -> dict[str, Receiver]:
    """Every configured receiver; secrets are read from the environment here."""
    out: dict[str, Receiver] = {}
    for name, rc in cfg.receivers.items():
        if isinstance(rc, SlackReceiverConfig):
            out[name] = SlackReceiver(name, rc, cfg.dashboard_url, environ)
        elif isinstance(rc, WebhookReceiverConfig):
            out[name] = WebhookReceiver(name, rc, cfg.dashboard_url, environ)
        elif isinstance(rc, LogReceiverConfig):
            out[name] = LogReceiver(name, cfg.dashboard_url)
    return out


__all__ = [
    "DeliveryError",
    "LogReceiver",
    "Receiver",
    "SlackReceiver",
    "WebhookReceiver",
    "build_receivers",
    "sign",
    "verify_signature",
]
