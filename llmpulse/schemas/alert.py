"""Alert: a rule's verdict on a window, with its lifecycle state and the evidence behind it.

Every firing alert says why in terms a person can check: ``value`` against ``threshold``
(or ``baseline``), the band a healthy value lies in (``expected_low`` .. ``expected_high``;
one side may be open), and ``evidence``: the numbers the rule decided on (``n`` calls,
``count``, ``p_value``, a confidence ``bound``, SLO ``burn_rate_long``/``burn_rate_short``
and ``error_budget_remaining``...). Older producers leave the new fields empty.

``rule_type`` says what kind of rule fired (threshold, slo, anomaly, budget, composite): the
notifier paces by it (a daily budget alert is not repeated while it fires, and stays out of
incident grouping: a spent budget is not an outage, see docs/notify.md).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from llmpulse.schemas.base import IdStr, UtcDatetime, WireModel, new_event_id, utc_now

Severity = Literal["warning", "critical"]
AlertState = Literal["firing", "resolved"]
RuleType = Literal["threshold", "slo", "anomaly", "budget", "composite"]


def alert_fingerprint(rule: str, dimensions: dict[str, str]) -> str:
    """Rule plus dimensions: one alert stream per fingerprint."""
    dims = ",".join(f"{k}={dimensions[k]}" for k in sorted(dimensions)) or "*"
    return f"{rule}|{dims}"


class Alert(WireModel):
    alert_id: IdStr = Field(default_factory=new_event_id)
    fingerprint: Annotated[str, Field(min_length=1, max_length=1024)]
    rule: Annotated[str, Field(min_length=1, max_length=256)]
    severity: Severity
    state: AlertState
    metric: Annotated[str, Field(max_length=128)]
    value: float | None = None
    threshold: float | None = None
    baseline: float | None = None
    dimensions: dict[str, str] = Field(default_factory=dict)
    window_start: UtcDatetime
    window_end: UtcDatetime
    started_at: UtcDatetime
    ts: UtcDatetime = Field(default_factory=utc_now)
    summary: Annotated[str, Field(max_length=4096)] = ""
    root_cause: dict[str, str | float] | None = None
    expected_low: float | None = None
    expected_high: float | None = None
    evidence: dict[str, str | float] | None = None
    rule_type: RuleType | None = None
