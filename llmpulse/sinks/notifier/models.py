"""Wire models of the notifier's internal topics: silences and the delivery log."""

from __future__ import annotations

import fnmatch
from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field

from llmpulse.schemas.alert import Alert, Severity
from llmpulse.schemas.base import IdStr, UtcDatetime, WireModel, new_event_id, utc_now

SEVERITY_RANK: dict[str, int] = {"warning": 1, "critical": 2}


def pattern_match(pattern: str, value: str) -> bool:
    """Shell-style match (`*`, `?`, `[...]`), case-sensitive."""
    return fnmatch.fnmatchcase(value, pattern)


class Silence(WireModel):
    """Mutes alerts whose rule and dimensions match, from `starts_at` until `ends_at`."""

    silence_id: IdStr = Field(default_factory=new_event_id)
    rule: Annotated[str, Field(max_length=256)] | None = Field(
        default=None, description="rule name pattern; any rule when unset"
    )
    dimensions: dict[str, str] = Field(
        default_factory=dict, description="dimension -> value pattern; the alert must have each"
    )
    starts_at: UtcDatetime = Field(default_factory=utc_now)
    ends_at: UtcDatetime
    created_by: Annotated[str, Field(max_length=256)] = ""
    comment: Annotated[str, Field(max_length=4096)] = ""
    created_at: UtcDatetime = Field(default_factory=utc_now)

    def active(self, now: datetime) -> bool:
        return self.starts_at <= now < self.ends_at

    def matches(self, alert: Alert) -> bool:
        if self.rule is not None and not pattern_match(self.rule, alert.rule):
            return False
        for key, pattern in self.dimensions.items():
            value = alert.dimensions.get(key)
            if value is None or not pattern_match(pattern, value):
                return False
        return True


class FiringEntry(WireModel):
    """What a receiver was last told about one firing fingerprint."""

    severity: Severity
    started_at: UtcDatetime


class DeliveryRecord(WireModel):
    """The delivery log (notification log): the last notification of one aggregation group.

    Keyed by the group id (route, receiver, group key) in the compacted topic
    `notifications`, so compaction keeps exactly the state a restart needs: what each
    receiver was told is firing (and the alerts themselves, to repeat and resolve them).
    """

    group_id: Annotated[str, Field(min_length=1, max_length=2048)]
    route: Annotated[str, Field(max_length=100)]
    receiver: Annotated[str, Field(max_length=100)]
    group_key: Annotated[str, Field(max_length=2048)]
    group_labels: dict[str, str] = Field(default_factory=dict)
    notification_id: IdStr
    seq: Annotated[int, Field(ge=1)]
    ts: UtcDatetime = Field(default_factory=utc_now)
    status: Literal["delivered", "failed"] = "delivered"
    error: Annotated[str, Field(max_length=4096)] = ""
    firing: dict[str, FiringEntry] = Field(
        default_factory=dict, description="fingerprint -> what the receiver was told is firing"
    )
    alerts: list[Alert] = Field(default_factory=list, description="the firing alerts behind `firing`")
    resolved: dict[str, UtcDatetime] = Field(
        default_factory=dict,
        description="fingerprint -> started_at of incidents whose resolution was sent (stale replays)",
    )
    covered: list[str] = Field(default_factory=list, description="alert ids this notification listed")
    message_ref: dict[Annotated[str, Field(max_length=100)], Annotated[str, Field(max_length=2048)]] = Field(
        default_factory=dict,
        description=(
            "the receiver's handle of the incident's message, which updates edit (Slack: channel"
            " and ts; webhook and log: the notification_id of the page); empty when the receiver"
            " cannot edit, the page was not delivered, or the incident resolved. Records written"
            " before it existed decode with none"
        ),
    )
