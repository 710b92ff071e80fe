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

from collections.abc import Mapping
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


def format_number(v: float | None) -> str:
    """A figure for people: 4 significant digits, thousands separated, tiny or huge in e-notation."""
    if v is None:
        return "n/a"
    if v == 0 or 0.01 <= abs(v) < 1e6:
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return f"{v:.3g}"


def _f(v: object) -> float:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def _span(v: object) -> str:
    s = int(_f(v)) if v is not None else 0
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s and s % size == 0:
            return f"{s // size}{unit}"
    return f"{s}s"


def evidence_text(evidence: Mapping[str, str | float] | None) -> str:
    """An alert's evidence in words a person can check, the one wording every surface uses
    (the alert's summary, Slack, the webhook's ``why``, the dashboard): ``13 of 20, p=3.4e-05
    (binomial)``, the span of windows pooled for a low-traffic series, a confidence bound,
    SLO burn rates and the error budget left, a budget's day total. Empty when there is none."""
    ev = evidence or {}
    parts: list[str] = []
    if "burn_rate_long" in ev:
        parts.append(
            f"error budget burning {format_number(_f(ev['burn_rate_long']))}x over {_span(ev.get('long_window_s'))}"
            f" and {format_number(_f(ev.get('burn_rate_short')))}x over {_span(ev.get('short_window_s'))}"
            f" (alert above {format_number(_f(ev.get('burn_rate_threshold')))}x)"
        )
        if "long_calls" in ev and "long_errors" in ev:
            parts.append(
                f"{_f(ev['long_errors']):.0f} of {_f(ev['long_calls']):.0f} calls failed over "
                f"{_span(ev.get('long_window_s'))}"
            )
        if "error_budget_remaining" in ev:
            parts.append(f"{_f(ev['error_budget_remaining']) * 100:.0f}% of the error budget left")
    if "count" in ev and "n" in ev:
        parts.append(f"{_f(ev['count']):.0f} of {_f(ev['n']):.0f}")
    elif "n" in ev:
        parts.append(f"n={_f(ev['n']):.0f}")
    elif "count" in ev:
        parts.append(f"count {_f(ev['count']):.0f}")
    if "span_s" in ev and "windows" in ev:  # a low-traffic window pooled with the ones before it
        parts.append(f"over the last {_span(ev['span_s'])} ({_f(ev['windows']):.0f} windows pooled)")
    if "p_value" in ev:
        test = f" ({ev['test']})" if "test" in ev else ""
        parts.append(f"p={_f(ev['p_value']):.2g}{test}")
    if "bound" in ev and "confidence" in ev:
        parts.append(f"{_f(ev['confidence']) * 100:g}% bound {format_number(_f(ev['bound']))}")
    if "history" in ev:
        parts.append(f"baseline: {ev['history']}")
    if "day_total" in ev:
        day = f" on {ev['day']}" if "day" in ev else ""
        parts.append(f"total {format_number(_f(ev['day_total']))}{day} (UTC)")
    return ", ".join(parts)


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

    def why(self) -> str:
        """The evidence in words (``evidence_text``)."""
        return evidence_text(self.evidence)
