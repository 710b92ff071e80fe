"""ActionEvent: one step in the life of an action taken on an alert (issue 10)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from llmpulse.schemas.base import IdStr, UtcDatetime, WireModel, new_event_id, utc_now

ActionKind = Literal["rate_limit", "block", "fallback", "open_circuit", "hook"]
ActionStatus = Literal["proposed", "pending", "approved", "rejected", "applied", "expired", "undone", "failed"]


class ActionEvent(WireModel):
    """Published to the compacted `actions` topic keyed by action_id (latest state wins) and
    written to the ClickHouse `actions` table (one row per step)."""

    event_id: IdStr = Field(default_factory=new_event_id, description="id of this step")
    action_id: IdStr
    ts: UtcDatetime = Field(default_factory=utc_now)
    status: ActionStatus
    kind: ActionKind
    rule: Annotated[str, Field(max_length=256)] = Field(description="action rule name from config")
    alert_fingerprint: Annotated[str, Field(max_length=1024)] = ""
    alert_id: Annotated[str, Field(max_length=128)] = ""
    target: dict[str, str] = Field(default_factory=dict, description="e.g. {'api_key_hash': ...} or {'model': ...}")
    params: dict[str, Any] = Field(default_factory=dict, description="limits, fallback model, hook result")
    expires_at: UtcDatetime | None = None
    actor: Annotated[str, Field(max_length=256)] = "llmpulse"
    reason: Annotated[str, Field(max_length=4096)] = ""
