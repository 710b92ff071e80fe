"""The notifier: `llmpulse.alerts` to Slack, signed webhooks and the log; grouped,
silenced, inhibited, retried, and delivered once each across restarts."""

from llmpulse.sinks.notifier.receivers.webhook import verify_signature
from llmpulse.sinks.notifier.service import Notifier, run_notifier

__all__ = ["Notifier", "run_notifier", "verify_signature"]
