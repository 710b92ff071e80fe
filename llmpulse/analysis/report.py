"""`llmpulse report`: a period's figures by model, app, user or API key, against the period before.

Exact figures from `llm_calls FINAL`: requests, error rate, p95 latency, p95 time to first
token, tokens, cost per group and in total; the top error types; the alerts that fired;
the error budget left of each SLO rule (issue 14) judged on the report's dimension, over the
rule's period up to the report's end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from llmpulse.analysis.panels import Runner, ts_lit

if TYPE_CHECKING:
    from llmpulse.streams.rules.model import SloRule

ReportBy = Literal["model", "app", "user", "key"]
COLUMN = {"model": "model", "app": "app", "user": "user", "key": "api_key_hash"}


class Figures(BaseModel):
    requests: int = 0
    errors: int = 0
    error_rate: float = 0.0
    latency_p95_ms: float | None = None
    ttft_p95_ms: float | None = None
    tokens: int = 0
    cost_usd: float = 0.0


class GroupRow(BaseModel):
    name: str
    current: Figures
    previous: Figures


class ErrorType(BaseModel):
    error_type: str
    count: int
    previous: int


class AlertsFired(BaseModel):
    rule: str
    severity: str
    alerts: int
    fingerprints: int


class ErrorBudget(BaseModel):
    """What is left of an SLO's error budget over its period: 1 - (errors / calls) / (1 - objective)."""

    rule: str
    objective: float
    period_days: int
    dimension: str = ""  # the column judged (model, app, user, api_key_hash); "" for all traffic
    group: str
    requests: int
    errors: int
    remaining: float


class Report(BaseModel):
    by: ReportBy
    start: datetime
    end: datetime
    previous_start: datetime
    total: GroupRow
    groups: list[GroupRow]
    error_types: list[ErrorType]
    alerts: list[AlertsFired]
    error_budgets: list[ErrorBudget] = []


def _f(v: Any) -> float | None:
    if v is None:
        return None
    x = float(v)
    return None if math.isnan(x) else x


def _figures(row: list[Any]) -> Figures:
    req, err, p95, ttft, tok, cost = row
    req, err = int(req), int(err or 0)
    return Figures(requests=req, errors=err, error_rate=err / req if req else 0.0,
                   latency_p95_ms=_f(p95) if req else None, ttft_p95_ms=_f(ttft) if req else None,
                   tokens=int(tok or 0), cost_usd=float(cost or 0))  # fmt: skip


FIGS = ("count(), sum(is_error), quantile(0.95)(latency_ms), quantile(0.95)(ttft_ms), "
        "sum(total_tokens), sum(cost_usd)")  # fmt: skip


def _budget_rows(run: Runner, db: str, rule: SloRule, col: str | None, end: datetime, top: int) -> list[ErrorBudget]:
    """One SLO's budget left over its period up to `end`: per value of `col` (the `top` by
    calls), or on all traffic when `col` is None."""
    start = end - timedelta(seconds=rule.period)
    where = f"ts >= {ts_lit(start)} AND ts < {ts_lit(end)}"
    if col is not None:
        rows = run(f"SELECT {col}, count(), sum(is_error) FROM {db}.llm_calls FINAL WHERE {where} "
                   f"GROUP BY {col} ORDER BY count() DESC, {col} LIMIT {top}").rows  # fmt: skip
    else:
        rows = [["total", *r] for r in run(f"SELECT count(), sum(is_error) FROM {db}.llm_calls FINAL WHERE {where}").rows]
    out: list[ErrorBudget] = []
    for name, n, e in rows:
        n, e = int(n), int(e or 0)
        if n == 0:
            continue
        left = 1.0 - (e / n) / (1.0 - rule.objective)
        out.append(ErrorBudget(rule=rule.name, objective=rule.objective, period_days=rule.period // 86400,
                               dimension=col or "", group=str(name) or "(none)", requests=n, errors=e,
                               remaining=left))  # fmt: skip
    return out


def error_budgets(run: Runner, db: str, by: ReportBy, slos: Sequence[SloRule], end: datetime, top: int) -> list[ErrorBudget]:
    """Per SLO rule judged by the report's dimension (or on all traffic): the budget left."""
    col = COLUMN[by]
    out: list[ErrorBudget] = []
    for rule in slos:
        if (col,) in rule.dim_sets:
            out += _budget_rows(run, db, rule, col, end, top)
        elif () in rule.dim_sets:
            out += _budget_rows(run, db, rule, None, end, top)
    return out


class SloPanel(BaseModel):
    """The dashboard's SLO panel: every SLO rule's budget left, as `llmpulse report` computes it."""

    end: datetime
    budgets: list[ErrorBudget]
    skipped: list[str] = []  # dimension sets of several columns (not shown: one row per combination)


def slo_panel(run: Runner, db: str, slos: Sequence[SloRule], end: datetime, top: int = 20) -> SloPanel:
    """Per SLO rule and dimension set it judges (all traffic, or one of model, app, user,
    api_key_hash): the budget left over the rule's period up to `end`, lowest first."""
    budgets: list[ErrorBudget] = []
    skipped: list[str] = []
    known = set(COLUMN.values())
    for rule in slos:
        for dims in rule.dim_sets:
            if dims == ():
                budgets += _budget_rows(run, db, rule, None, end, top)
            elif len(dims) == 1 and dims[0] in known:
                budgets += sorted(_budget_rows(run, db, rule, dims[0], end, top), key=lambda b: b.remaining)
            else:
                skipped.append(f"{rule.name}: by {', '.join(dims)}")
    return SloPanel(end=end, budgets=budgets, skipped=skipped)


def build_report(run: Runner, db: str, by: ReportBy, since: timedelta, end: datetime | None = None, top: int = 20,
                 slos: Sequence[SloRule] = ()) -> Report:  # fmt: skip
    end = end or datetime.now(UTC)
    start = end - since
    prev = start - since
    col = COLUMN[by]

    def where(a: datetime, b: datetime) -> str:
        return f"ts >= {ts_lit(a)} AND ts < {ts_lit(b)}"

    cur_total = _figures(run(f"SELECT {FIGS} FROM {db}.llm_calls FINAL WHERE {where(start, end)}").rows[0])
    prev_total = _figures(run(f"SELECT {FIGS} FROM {db}.llm_calls FINAL WHERE {where(prev, start)}").rows[0])
    cur = run(f"SELECT {col}, {FIGS} FROM {db}.llm_calls FINAL WHERE {where(start, end)} "
              f"GROUP BY {col} ORDER BY count() DESC, {col} LIMIT {top}").rows  # fmt: skip
    names = [str(r[0]) for r in cur]
    before: dict[str, Figures] = {}
    if names:
        in_list = ", ".join("'" + n.replace("\\", "\\\\").replace("'", "\\'") + "'" for n in names)
        for r in run(f"SELECT {col}, {FIGS} FROM {db}.llm_calls FINAL WHERE {where(prev, start)} "
                     f"AND {col} IN ({in_list}) GROUP BY {col}").rows:  # fmt: skip
            before[str(r[0])] = _figures(r[1:])
    groups = [GroupRow(name=str(r[0]) or "(none)", current=_figures(r[1:]), previous=before.get(str(r[0]), Figures()))
              for r in cur]  # fmt: skip
    errs = run(
        f"SELECT error_type, countIf(ts >= {ts_lit(start)}) AS c, countIf(ts < {ts_lit(start)}) AS p "
        f"FROM {db}.llm_calls FINAL WHERE {where(prev, end)} AND is_error = 1 "
        f"GROUP BY error_type HAVING c > 0 ORDER BY c DESC, error_type LIMIT 5"
    ).rows
    alerts = run(
        f"SELECT rule, severity, count(), uniqExact(fingerprint) FROM {db}.alerts FINAL "
        f"WHERE {where(start, end)} AND state = 'firing' GROUP BY rule, severity ORDER BY count() DESC, rule"
    ).rows
    return Report(
        by=by, start=start, end=end, previous_start=prev,
        total=GroupRow(name="total", current=cur_total, previous=prev_total), groups=groups,
        error_types=[ErrorType(error_type=str(e) or "(unknown)", count=int(c), previous=int(p)) for e, c, p in errs],
        alerts=[AlertsFired(rule=str(r), severity=str(s), alerts=int(n), fingerprints=int(f)) for r, s, n, f in alerts],
        error_budgets=error_budgets(run, db, by, slos, end, top),
    )  # fmt: skip


def _change(cur: float | None, prev: float | None, pct_points: bool = False) -> str:
    if cur is None or prev is None:
        return ""
    if pct_points:
        return f"{(cur - prev) * 100:+.2f}pp"
    if prev == 0:
        return "new" if cur else ""
    return f"{(cur - prev) / prev * 100:+.0f}%"


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_report(rep: Report) -> str:
    span = rep.end - rep.start
    lines = [
        f"llmpulse report by {rep.by}: {rep.start:%Y-%m-%d %H:%M} - {rep.end:%Y-%m-%d %H:%M} UTC "
        f"({span}), compared with the {span} before",
        "",
    ]
    head = ["group", "requests", "chg", "error rate", "chg", "p95 ms", "chg", "ttft p95 ms", "tokens", "chg", "cost $", "chg"]
    table = [head]
    for g in [*rep.groups, rep.total]:
        c, p = g.current, g.previous
        table.append([
            g.name, str(c.requests), _change(c.requests, p.requests), f"{c.error_rate * 100:.2f}%",
            _change(c.error_rate, p.error_rate, True), _num(c.latency_p95_ms, ".0f"),
            _change(c.latency_p95_ms, p.latency_p95_ms), _num(c.ttft_p95_ms, ".0f"), str(c.tokens),
            _change(c.tokens, p.tokens), f"{c.cost_usd:.4f}", _change(c.cost_usd, p.cost_usd),
        ])  # fmt: skip
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for n, r in enumerate(table):
        if n == len(table) - 1:
            lines.append("  ".join("-" * w for w in widths))
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("top error types: " + (", ".join(
        f"{e.error_type} {e.count} ({_change(e.count, e.previous) or 'same'})" for e in rep.error_types) or "none"))  # fmt: skip
    lines.append("alerts fired: " + (", ".join(
        f"{a.rule} [{a.severity}] {a.alerts}x on {a.fingerprints} series" for a in rep.alerts) or "none"))  # fmt: skip
    rules = dict.fromkeys((b.rule, b.objective, b.period_days) for b in rep.error_budgets)
    for rule, objective, days in rules:
        lines.append(f"error budget left ({rule}: {objective * 100:g}% over {days}d): " + ", ".join(
            f"{b.group} {b.remaining * 100:.0f}% ({b.errors} errors in {b.requests} calls)"
            for b in rep.error_budgets if b.rule == rule))  # fmt: skip
    return "\n".join(lines)
