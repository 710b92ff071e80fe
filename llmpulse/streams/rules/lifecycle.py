"""The alert state machine of one fingerprint (rule + dimension set), as plain JSON data.

Per rule and dimension set the state is a dict::

    {"streak": 2,             # consecutive breaching windows (capped at the rule's `for`)
     "streak_start": 1700000000000,   # ms: start of the first window of the streak
     "alert": null | {"severity": "warning", "started_at": 1700000000000, "clear": 0,
                      "metric": "error_rate"}}

Transitions, one verdict (None, "warning" or "critical") per window:
- not firing, breaching for `for` windows  -> fires: one event (state firing)
- firing warning, verdict critical         -> escalates: one event (state firing, critical)
- firing critical, verdict warning         -> nothing (an incident keeps its highest severity)
- firing, `resolve_after` clear windows    -> resolves: one event (state resolved)
A breach while firing resets the clear count. A held window (``hold``: no evidence of the
breach, but no recovery either) leaves a firing alert as it is and breaks a streak.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from llmpulse.streams.rules.model import SEVERITY_RANK, Severity

State = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Transition:
    change: Literal["fired", "escalated", "resolved"]
    severity: Severity
    started_at_ms: int

    @property
    def state(self) -> Literal["firing", "resolved"]:
        return "resolved" if self.change == "resolved" else "firing"


def advance(
    st: State,
    verdict: Severity | None,
    window_start_ms: int,
    *,
    metric: str,
    for_windows: int = 1,
    resolve_after: int = 1,
    hold: bool = False,
) -> Transition | None:
    """Apply one window's verdict to ``st`` (mutated); the event to publish, if any."""
    if verdict is None:
        st["streak"] = 0
    else:
        streak = int(st.get("streak", 0))
        if streak == 0:
            st["streak_start"] = window_start_ms
        st["streak"] = min(streak + 1, for_windows)
    alert: dict[str, Any] | None = st.get("alert")
    if alert is None:
        if verdict is None or st["streak"] < for_windows:
            return None
        started = int(st.get("streak_start", window_start_ms))
        st["alert"] = {"severity": verdict, "started_at": started, "clear": 0, "metric": metric}
        return Transition("fired", verdict, started)
    if verdict is None:
        if hold:
            return None
        alert["clear"] = int(alert.get("clear", 0)) + 1
        if alert["clear"] >= resolve_after:
            st["alert"] = None
            return Transition("resolved", alert["severity"], int(alert["started_at"]))
        return None
    alert["clear"] = 0
    if SEVERITY_RANK[verdict] > SEVERITY_RANK[alert["severity"]]:
        alert["severity"] = verdict
        return Transition("escalated", verdict, int(alert["started_at"]))
    return None


def firing_severity(st: State | None) -> Severity | None:
    """The severity of the firing alert in ``st``; None when not firing."""
    if not st:
        return None
    alert = st.get("alert")
    if alert is None:
        return None
    sev: Severity = alert["severity"]
    return sev
