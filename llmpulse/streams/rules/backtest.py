"""Backtest: stored windows replayed through a rules file, to tune rules before switching them on.

Guarantee: the same engine the worker runs judges the same final windows (``llm_aggregates``
read FINAL, so backfilled corrections count once), each dimension set in window order,
with state kept exactly as the worker keeps it; what it reports is what those rules would
have published. It defends against tuning rules on production pages: a rules file is tried
on last week's traffic in seconds, per rule and per day.

Baselines (anomalies, SLO windows) need history: windows before ``count_from`` (the warm-up)
are judged but their alerts are not counted. Dimension sets that went quiet are not swept,
so a backtest counts firings exactly and may show fewer resolutions than the worker would.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from llmpulse.schemas import Alert, WindowAggregate
from llmpulse.streams.rules.engine import RulesEngine, new_state
from llmpulse.streams.rules.model import RuleSet


class DayCount(BaseModel):
    day: str  # YYYY-MM-DD (UTC)
    rule: str
    severity: str
    alerts: int  # firing events (fired or escalated)
    series: int  # distinct fingerprints


class BacktestResult(BaseModel):
    source: str
    start: datetime
    end: datetime
    windows: int  # windows judged in the counted period
    by_day: list[DayCount]
    examples: list[Alert]  # the first firing alert of each rule


def backtest(
    rules: RuleSet, aggregates: Iterable[WindowAggregate], count_from: datetime, end: datetime
) -> BacktestResult:
    """Judge ``aggregates`` (in window-end order) and count the firing alerts from ``count_from``."""
    engine = RulesEngine(rules)
    states: dict[str, dict[str, Any]] = {}
    counts: dict[tuple[str, str, str], int] = {}
    series: dict[tuple[str, str, str], set[str]] = {}
    examples: dict[str, Alert] = {}
    windows = 0
    for agg in aggregates:
        if not engine.applies(agg):
            continue
        state = states.get(agg.dims_key)
        if state is None:
            state = states[agg.dims_key] = new_state()
        alerts = engine.evaluate(agg, state)
        if agg.window_start < count_from:
            continue
        windows += 1
        for a in alerts:
            if a.state != "firing":
                continue
            key = (a.window_start.strftime("%Y-%m-%d"), a.rule, a.severity)
            counts[key] = counts.get(key, 0) + 1
            series.setdefault(key, set()).add(a.fingerprint)
            examples.setdefault(a.rule, a)
    by_day = [
        DayCount(day=d, rule=r, severity=sev, alerts=n, series=len(series[(d, r, sev)]))
        for (d, r, sev), n in sorted(counts.items())
    ]
    return BacktestResult(
        source=rules.source,
        start=count_from,
        end=end,
        windows=windows,
        by_day=by_day,
        examples=[examples[k] for k in sorted(examples)],
    )


def format_backtest(res: BacktestResult) -> str:
    """A table: one line per day, one column per rule (firing alerts, severities summed)."""
    head = (
        f"backtest of {res.source}: {res.start:%Y-%m-%d %H:%M} - {res.end:%Y-%m-%d %H:%M} UTC, "
        f"{res.windows} windows judged"
    )
    if not res.by_day:
        return head + "\nnothing would have fired"
    rules = sorted({c.rule for c in res.by_day})
    days = sorted({c.day for c in res.by_day})
    per: dict[tuple[str, str], int] = {}
    for c in res.by_day:
        per[(c.day, c.rule)] = per.get((c.day, c.rule), 0) + c.alerts
    table = [["day", *rules, "total"]]
    for d in days:
        row = [per.get((d, r), 0) for r in rules]
        table.append([d, *map(str, row), str(sum(row))])
    totals = [sum(per.get((d, r), 0) for d in days) for r in rules]
    table.append(["total", *map(str, totals), str(sum(totals))])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = [head, ""]
    for n, r in enumerate(table):
        if n == len(table) - 1 or n == 1:
            lines.append("  ".join("-" * w for w in widths))
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True))))
    lines.append("")
    lines.append("first alert of each rule:")
    lines.extend(f"  {a.rule}: {a.summary}" for a in res.examples)
    return "\n".join(lines)
