"""What a notification says about actions waiting for approval.

Action ids are derived from the action rule and the incident (see `model.action_id_of`),
so the notifier can name the pending action of an alert without reading the actions
topic: `approval_lines(alert, settings.actions)` gives, for each action rule with
`approve: true` that matches the firing alert, a line saying it is pending and how to
approve it.
"""

from __future__ import annotations

from llmpulse.actions.model import action_id_of, describe, matches, propose
from llmpulse.config.actions import ActionsConfig
from llmpulse.schemas.alert import Alert

_configured: ActionsConfig | None = None


def configure_hints(cfg: ActionsConfig | None) -> None:
    """Set the action rules `approval_lines` uses when called without a config (the notifier)."""
    global _configured
    _configured = cfg


def approval_lines(alert: Alert, cfg: ActionsConfig | None = None) -> list[str]:
    rules = cfg if cfg is not None else _configured
    if rules is None or alert.state != "firing":
        return []
    out = []
    for rule in rules.rules:
        if not rule.approve or not matches(rule, alert):
            continue
        proposed = propose(rule, alert)
        if proposed is None:
            continue
        aid = action_id_of(rule.name, alert)
        out.append(
            f"Action `{rule.name}` ({describe(proposed)}) is pending approval: "
            f"`llmpulse actions approve {aid}` (or `llmpulse actions reject {aid}`)"
        )
    return out
