"""Action rules against alerts, and the steps of an action's life (pure functions).

An action is identified by its rule and the incident that caused it (alert fingerprint
and `started_at`), so the same incident never gets the same action twice, whichever
process or restart looks at it. Every step of its life is one `ActionEvent`:

    proposed -> applied                                  (no approval)
    proposed -> pending -> approved -> applied           (approve: true)
    pending  -> rejected | expired                       (not approved in time)
    applied  -> expired (duration over) | undone (by a person, or the alert resolved)
    any hook -> failed                                   (the hook failed or timed out)

The current state of an action is its step of highest rank (see `RANK`): rank, not
arrival order, decides, so steps may be read from any partition in any order.
"""

from __future__ import annotations

import fnmatch
import hashlib
from datetime import datetime, timedelta
from typing import Any

from llmpulse.config.actions import ActionRule, ActionsConfig
from llmpulse.schemas.action import ActionEvent, ActionStatus
from llmpulse.schemas.alert import Alert
from llmpulse.schemas.base import utc_now

RANK: dict[str, int] = {
    "proposed": 0,
    "pending": 1,
    "approved": 2,
    "applied": 3,
    "rejected": 4,
    "expired": 4,
    "undone": 4,
    "failed": 4,
}
TERMINAL = frozenset(s for s, r in RANK.items() if r == 4)
LIVE = frozenset({"proposed", "pending", "approved", "applied"})
ENFORCED = frozenset({"rate_limit", "block", "fallback", "open_circuit"})


def matches(rule: ActionRule, alert: Alert) -> bool:
    """Does this firing alert call for this action rule (rule name, severity, dimensions)?"""
    m = rule.match
    if alert.severity not in m.severity or not fnmatch.fnmatchcase(alert.rule, m.rule):
        return False
    for key, pattern in m.dimensions.items():
        value = alert.dimensions.get(key)
        if value is None or not fnmatch.fnmatchcase(value, pattern):
            return False
    return True


def action_id_of(rule_name: str, alert: Alert) -> str:
    """Deterministic: one action per action rule and incident (fingerprint + started_at)."""
    text = f"{rule_name}|{alert.fingerprint}|{alert.started_at.isoformat()}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def step_key(action_id: str, status: str) -> str:
    """Kafka key (and event_id) of one step: every step survives compaction of the topic."""
    return f"{action_id}:{status}"


def _dimension(alert: Alert, name: str) -> str | None:
    """The alert's value of a dimension, else its root cause when that names the dimension."""
    value = alert.dimensions.get(name)
    if value:
        return value
    rc = alert.root_cause
    if rc and rc.get("dimension") == name and isinstance(rc.get("value"), str) and rc["value"]:
        return str(rc["value"])
    return None


def target_of(rule: ActionRule, alert: Alert) -> dict[str, str] | None:
    """What the action acts on; None when the alert does not say (no action then)."""
    kind = rule.action
    if kind in ("rate_limit", "block"):
        v = _dimension(alert, rule.scope)
        return {rule.scope: v} if v else None
    if kind == "fallback":
        v = rule.model or _dimension(alert, "model")
        return {"model": v} if v else None
    if kind == "open_circuit":
        v = rule.upstream or _dimension(alert, "provider")
        return {"upstream": v} if v else None
    return dict(alert.dimensions)


def params_of(rule: ActionRule, alert: Alert) -> dict[str, Any]:
    p: dict[str, Any] = {"duration_s": rule.duration, "undo_on_resolve": rule.undo_on_resolve, "approve": rule.approve}
    if rule.action == "rate_limit":
        if rule.requests_per_minute:
            p["requests_per_minute"] = rule.requests_per_minute
        if rule.tokens_per_minute:
            p["tokens_per_minute"] = rule.tokens_per_minute
    elif rule.action == "fallback":
        if rule.fallback_model:
            p["fallback_model"] = rule.fallback_model
        if rule.fallback_upstream:
            p["fallback_upstream"] = rule.fallback_upstream
    elif rule.action == "hook":
        p["alert"] = alert.model_dump(mode="json", exclude_none=True)
    return p


def propose(rule: ActionRule, alert: Alert, now: datetime | None = None) -> ActionEvent | None:
    """The `proposed` step of the action this rule takes on this firing alert (None: no target)."""
    target = target_of(rule, alert)
    if target is None:
        return None
    aid = action_id_of(rule.name, alert)
    summary = alert.summary or f"{alert.rule} {alert.metric}={alert.value}"
    return ActionEvent(
        event_id=step_key(aid, "proposed"),
        action_id=aid,
        ts=now or utc_now(),
        status="proposed",
        kind=rule.action,
        rule=rule.name,
        alert_fingerprint=alert.fingerprint,
        alert_id=alert.alert_id,
        target=target,
        params=params_of(rule, alert),
        reason=summary[:4096],
    )


def step(
    prev: ActionEvent,
    status: ActionStatus,
    *,
    actor: str = "llmpulse",
    reason: str = "",
    expires_at: datetime | None = None,
    params: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> ActionEvent:
    """The next step of an action: the same action with a new status, time and actor."""
    return prev.model_copy(
        update={
            "event_id": step_key(prev.action_id, status),
            "status": status,
            "ts": now or utc_now(),
            "actor": actor[:256],
            "reason": reason[:4096],
            "expires_at": expires_at,
            "params": params if params is not None else prev.params,
        }
    )


def approval_timeout_of(cfg: ActionsConfig, rule_name: str) -> float:
    for r in cfg.rules:
        if r.name == rule_name and r.approval_timeout is not None:
            return r.approval_timeout
    return cfg.approval_timeout


def applied_until(ev: ActionEvent, now: datetime) -> datetime | None:
    """Expiry of an applied action: now + its duration (hooks run once: no expiry)."""
    if ev.kind == "hook":
        return None
    return now + timedelta(seconds=float(ev.params.get("duration_s", 900.0)))


def describe(ev: ActionEvent) -> str:
    """One line: what the action does."""
    t = ", ".join(f"{k}={v}" for k, v in sorted(ev.target.items())) or "all"
    p = ev.params
    if ev.kind == "rate_limit":
        lim = [f"{p[k]} {u}/min" for k, u in (("requests_per_minute", "requests"), ("tokens_per_minute", "tokens")) if p.get(k)]
        return f"rate-limit {t} to {' and '.join(lim)}"
    if ev.kind == "block":
        return f"block {t}"
    if ev.kind == "fallback":
        to = p.get("fallback_model") or ev.target.get("model", "?")
        via = f" on upstream {p['fallback_upstream']}" if p.get("fallback_upstream") else ""
        return f"route {t} to {to}{via}"
    if ev.kind == "open_circuit":
        return f"open the circuit of {t}"
    return f"run hook for {ev.alert_fingerprint}"
