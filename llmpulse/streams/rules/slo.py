"""SLO burn-rate alerts (Google SRE workbook, "multiwindow, multi-burn-rate alerts").

Guarantee: a pair (long, short, burn rate) fires only while both its windows burn the
error budget faster than the pair's rate, so a brief blip (short window only) or an
incident already over (long window only) does not page; the state per dimension set is
bounded and each window costs O(spans).

The burn rate of a window is its error rate over the budget: ``(bad / total) / (1 -
objective)``; 1 spends exactly the budget over the period. The budget remaining is
``1 - (bad / total) / (1 - objective)`` over the calls of the period so far (UTC days).

State (plain JSON)::

    {"last": 28333333,            # index (window start / window) of the last window added
     "t": [...], "b": [...],      # rings of totals and bad calls, one slot per window,
                                  # as long as the longest span
     "sums": {"3600": [t, b], "300": [t, b], ...},   # running sums per span
     "days": [[19700, t, b], ...]}                    # per UTC day, the period's days
"""

from __future__ import annotations

from typing import Any

from llmpulse.schemas import WindowAggregate
from llmpulse.streams.rules.evidence import Evidence, Verdict
from llmpulse.streams.rules.model import DAY_S, SEVERITY_RANK, Severity, SloRule

State = dict[str, Any]


def add_window(rule: SloRule, st: State, window_start_s: int, total: int, bad: int) -> None:
    """Count one window into the rings; windows must come in order (the engine ensures it)."""
    spans_s = rule.spans_s  # a property that sorts: read once
    size = spans_s[0] // rule.window
    idx = window_start_s // rule.window
    spans = [s // rule.window for s in spans_s]
    last = st.get("last")
    if last is None or idx - int(last) >= size or len(st.get("t", ())) != size:
        st["t"] = [0] * size
        st["b"] = [0] * size
        st["sums"] = {str(s * rule.window): [0, 0] for s in spans}
    elif idx <= int(last):
        return
    else:
        t, b, sums = st["t"], st["b"], st["sums"]
        accs = [(s, sums[str(s * rule.window)]) for s in spans]  # looked up once, not per window
        for j in range(int(last) + 1, idx + 1):
            for s, acc in accs:  # minute j - s leaves the span of s windows ending at j
                slot = (j - s) % size
                acc[0] -= t[slot]
                acc[1] -= b[slot]
            t[j % size] = 0
            b[j % size] = 0
    slot = idx % size
    st["t"][slot] += total
    st["b"][slot] += bad
    for acc in st["sums"].values():
        acc[0] += total
        acc[1] += bad
    st["last"] = idx
    day = window_start_s // DAY_S
    days: list[list[int]] = st["days"] if "days" in st else st.setdefault("days", [])
    if days and days[-1][0] == day:
        days[-1][1] += total
        days[-1][2] += bad
    else:
        days.append([day, total, bad])
    oldest = day - rule.period // DAY_S + 1
    while days and days[0][0] < oldest:
        days.pop(0)


def burn_rate(rule: SloRule, st: State, span_s: int) -> tuple[float | None, int, int]:
    """(burn rate, total, bad) of the span ending with the last window; None without calls."""
    total, bad = st["sums"][str(span_s)]
    if total <= 0:
        return None, total, bad
    return (bad / total) / (1.0 - rule.objective), total, bad


def budget_remaining(rule: SloRule, st: State) -> float:
    """The share of the period's error budget left (negative when overspent)."""
    total = sum(int(d[1]) for d in st.get("days", ()))
    bad = sum(int(d[2]) for d in st.get("days", ()))
    if total <= 0:
        return 1.0
    return 1.0 - (bad / total) / (1.0 - rule.objective)


def judge_slo(rule: SloRule, agg: WindowAggregate, st: State) -> Verdict:
    start_s = round(agg.window_start.timestamp())
    add_window(rule, st, start_s, agg.requests, agg.errors)
    budget = budget_remaining(rule, st)
    level: Severity | None = None
    chosen: Evidence | None = None
    shown: tuple[float | None, float] = (None, rule.alerts[0].burn_rate)
    for pair in rule.alerts:
        long_rate, long_total, long_bad = burn_rate(rule, st, pair.long)
        short_rate, _, _ = burn_rate(rule, st, pair.short)
        ev: Evidence = {
            "objective": rule.objective,
            "long_window_s": pair.long,
            "short_window_s": pair.short,
            "burn_rate_long": -1.0 if long_rate is None else round(long_rate, 4),
            "burn_rate_short": -1.0 if short_rate is None else round(short_rate, 4),
            "burn_rate_threshold": pair.burn_rate,
            "long_calls": long_total,
            "long_errors": long_bad,
            "error_budget_remaining": round(budget, 6),
        }
        if chosen is None:
            chosen, shown = ev, (long_rate, pair.burn_rate)
        if long_rate is None or short_rate is None or long_total < rule.min_requests:
            continue
        burning = long_rate > pair.burn_rate and short_rate > pair.burn_rate
        if burning and (level is None or SEVERITY_RANK[pair.severity] > SEVERITY_RANK[level]):
            level, chosen, shown = pair.severity, ev, (long_rate, pair.burn_rate)
    assert chosen is not None
    value, threshold = shown
    # the band: a healthy error rate stays within the budget (burn rate 0 .. 1)
    return Verdict(level, value, threshold, 1.0, True, 0.0, 1.0, chosen)
