"""What people do with actions: list, approve, reject, undo (the CLI and the HTTP API call these).

Each returns the new step (already acknowledged by Kafka) or raises `LLMPulseError`
with a message for the user. Ids may be shortened to any unique prefix.
"""

from __future__ import annotations

from datetime import datetime

from llmpulse.actions.model import applied_until, step
from llmpulse.actions.state import ActionStore, ActionTopic
from llmpulse.config import Settings
from llmpulse.errors import LLMPulseError
from llmpulse.schemas.action import ActionEvent
from llmpulse.schemas.base import utc_now


def _one(store: ActionStore, action_id: str) -> ActionEvent:
    found = store.find(action_id)
    if not found:
        raise LLMPulseError(f"no action with id {action_id!r} (see `llmpulse actions list --all`)")
    if len(found) > 1:
        raise LLMPulseError(f"action id {action_id!r} is ambiguous: {', '.join(a.action_id for a in found[:5])}")
    return found[0]


def list_actions(
    settings: Settings, *, include_done: bool = False, bootstrap: str | None = None
) -> list[ActionEvent]:
    """Live actions (proposed, pending, approved, applied), or every action with `include_done`."""
    with ActionTopic(settings, bootstrap) as topic:
        store = topic.load()
    return store.all() if include_done else store.live()


def approve_action(
    settings: Settings, action_id: str, *, actor: str, bootstrap: str | None = None, now: datetime | None = None
) -> ActionEvent:
    """Approve a pending action. Built-in actions apply at once; hooks run in the engine."""
    at = now or utc_now()
    with ActionTopic(settings, bootstrap) as topic:
        ev = _one(topic.load(), action_id)
        if ev.status != "pending":
            raise LLMPulseError(f"action {ev.action_id} is {ev.status}, not pending: nothing to approve")
        if ev.expires_at is not None and ev.expires_at <= at:
            raise LLMPulseError(f"action {ev.action_id} expired at {ev.expires_at:%Y-%m-%d %H:%M:%S} UTC unapproved")
        approved = step(ev, "approved", actor=actor, reason="approved", now=at)
        topic.publish(approved)
        if ev.kind == "hook":
            return approved
        applied = step(approved, "applied", actor=actor, expires_at=applied_until(approved, at), reason=ev.reason, now=at)
        topic.publish(applied)
        return applied


def reject_action(
    settings: Settings, action_id: str, *, actor: str, reason: str = "", bootstrap: str | None = None
) -> ActionEvent:
    with ActionTopic(settings, bootstrap) as topic:
        ev = _one(topic.load(), action_id)
        if ev.status not in ("proposed", "pending"):
            raise LLMPulseError(f"action {ev.action_id} is {ev.status}: only a pending action can be rejected")
        out = step(ev, "rejected", actor=actor, reason=reason or "rejected")
        topic.publish(out)
        return out


def undo_action(
    settings: Settings, action_id: str, *, actor: str, reason: str = "", bootstrap: str | None = None
) -> ActionEvent:
    with ActionTopic(settings, bootstrap) as topic:
        ev = _one(topic.load(), action_id)
        if ev.status not in ("proposed", "pending", "approved", "applied"):
            raise LLMPulseError(f"action {ev.action_id} is already {ev.status}")
        out = step(ev, "undone", actor=actor, reason=reason or "undone by hand", expires_at=ev.expires_at)
        topic.publish(out)
        return out
