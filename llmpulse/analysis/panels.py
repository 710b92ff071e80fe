"""The dashboard's panels as SQL over the llmpulse tables, and their results as pydantic models.

Every function here takes a `Runner` (SQL -> QueryResult), so the same code reads the
embedded store through its owner, opens it directly, or talks to a ClickHouse server.
Exact figures read with `FINAL`. Charts read `llm_aggregates` (the worker's windows) when
a chart bucket is a whole number of `aggregate_window_s` windows and the filters fit one
dimension set the worker aggregates by; otherwise they read `llm_calls`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from llmpulse.analysis.readonly import QueryResult
from llmpulse.errors import LLMPulseError
from llmpulse.schemas.alert import evidence_text
from llmpulse.sinks.clickhouse.schema import hist_quantile_sql

Runner = Callable[[str], QueryResult]
GroupBy = Literal["none", "model", "app", "user"]
FILTER_DIMS = ("model", "app", "user")
NICE_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


def lit(value: str) -> str:
    """A ClickHouse string literal (queries also run read-only, so nothing can be written)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def ts_lit(ts: datetime) -> str:
    return f"toDateTime64({lit(ts.astimezone(UTC).strftime('%Y-%m-%d %H:%M:%S.%f')[:-3])}, 3, 'UTC')"


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """ISO 8601 (`2024-05-01T10:00:00Z`), epoch seconds/milliseconds, `now`, or `now-15m`."""
    now = now or datetime.now(UTC)
    t = text.strip()
    if t == "now":
        return now
    if t.startswith("now-"):
        return now - parse_duration(t[4:])
    if t.replace(".", "", 1).isdigit():
        v = float(t)
        return datetime.fromtimestamp(v / 1000 if v > 1e11 else v, UTC)
    try:
        dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise LLMPulseError(f"bad time {text!r}: expected ISO 8601, epoch seconds, 'now' or 'now-1h'") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def parse_duration(text: str) -> timedelta:
    """`90s`, `15m`, `24h`, `7d`, `2w`."""
    t = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    if len(t) < 2 or t[-1] not in units or not t[:-1].replace(".", "", 1).isdigit():
        raise LLMPulseError(f"bad duration {text!r}: expected a number and s, m, h, d or w (e.g. 24h)")
    secs = float(t[:-1]) * units[t[-1]]
    if secs <= 0:
        raise LLMPulseError(f"bad duration {text!r}: must be positive")
    return timedelta(seconds=secs)


class Filters(BaseModel):
    """The time range and filters every panel shares (the page's URL parameters)."""

    start: datetime
    end: datetime
    model: str | None = Field(default=None, max_length=500)
    app: str | None = Field(default=None, max_length=500)
    user: str | None = Field(default=None, max_length=500)
    status: str | None = Field(default=None, max_length=10, description="ok, error, or an HTTP status code")
    error_type: str | None = Field(default=None, max_length=200)

    @field_validator("status")
    @classmethod
    def _status(cls, v: str | None) -> str | None:
        if v in (None, "", "all"):
            return None
        if v in ("ok", "error") or (v.isdigit() and 100 <= int(v) <= 599):
            return v
        raise ValueError("status must be ok, error or an HTTP status code")

    @classmethod
    def from_params(cls, params: dict[str, str], default_range: timedelta, max_range: timedelta) -> Filters:
        now = datetime.now(UTC)
        end = parse_time(params["to"], now) if params.get("to") else now
        start = parse_time(params["from"], now) if params.get("from") else end - default_range
        if start >= end:
            raise LLMPulseError("the time range is empty: 'from' must be before 'to'")
        if end - start > max_range:
            raise LLMPulseError(f"the time range is wider than the limit of {max_range.total_seconds() / 86400:g} days")
        kw = {k: (params.get(k) or None) for k in ("model", "app", "user", "status", "error_type")}
        return cls(start=start, end=end, **kw)

    @property
    def dims(self) -> dict[str, str]:
        return {d: v for d in FILTER_DIMS if (v := getattr(self, d))}

    def calls_where(self, alias: str = "") -> str:
        p = alias
        conds = [f"{p}ts >= {ts_lit(self.start)}", f"{p}ts < {ts_lit(self.end)}"]
        for d, v in self.dims.items():
            conds.append(f"{p}{d} = {lit(v)}")
        if self.status == "ok":
            conds.append(f"{p}is_error = 0")
        elif self.status == "error":
            conds.append(f"{p}is_error = 1")
        elif self.status:
            conds.append(f"{p}status_code = {int(self.status)}")
        if self.error_type:
            conds.append(f"{p}error_type = {lit(self.error_type)}")
        return " AND ".join(conds)


def bucket_seconds(f: Filters, max_points: int) -> int:
    span = (f.end - f.start).total_seconds()
    want = span / max_points
    for s in NICE_STEPS:
        if s >= want:
            return s
    return int(math.ceil(want / 86400) * 86400)


Source = Literal["llm_aggregates", "llm_calls", "llm_calls_1m", "llm_calls_1h"]
ROLLUP_SECONDS = {"llm_calls_1h": 3600, "llm_calls_1m": 60}


class Series(BaseModel):
    name: str
    t: list[str]
    qps: list[float]
    error_rate: list[float]
    latency_p95_ms: list[float | None]
    ttft_p95_ms: list[float | None]
    tokens: list[int]
    cost_usd: list[float]
    requests: list[int]


class Timeseries(BaseModel):
    by: GroupBy
    step_s: int
    source: Source
    series: list[Series]


def _iso(v: Any) -> str:
    if isinstance(v, datetime):
        return v.astimezone(UTC).isoformat().replace("+00:00", "Z")
    s = str(v)
    if " " in s and "T" not in s:
        s = s.replace(" ", "T")
    if s.endswith("+00:00"):
        s = s[:-6]
    return s if s.endswith("Z") else s + "Z"


def _float(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return None if math.isnan(f) else f


def _aggregate_source(f: Filters, by: GroupBy, step: int, window_s: int) -> str | None:
    """The dims_key condition when llm_aggregates can answer, else None."""
    if step % window_s or f.status or f.error_type:
        return None
    dims = f.dims
    if len(dims) > 1 or (dims and by != "none" and by not in dims):
        return None
    if by == "none":
        if not dims:
            return "dims_key = '*'"
        (d, v), = dims.items()
        return f"dims_key = {lit(f'{d}={v}')}"
    if dims:
        return f"dims_key = {lit(f'{by}={dims[by]}')}"
    return f"startsWith(dims_key, {lit(by + '=')}) AND position(dims_key, ',') = 0"


def _rollup_fits(f: Filters, by: GroupBy, step: int, bucket_s: int) -> bool:
    """The roll-ups keep (bucket, model, provider, app): no user, status or error-type cut."""
    return not (step % bucket_s or f.user or f.status or f.error_type or by == "user")


def timeseries(run: Runner, db: str, f: Filters, by: GroupBy, max_points: int, max_series: int, window_s: int) -> Timeseries:
    """Per-bucket figures, from the cheapest table that answers exactly enough:
    the hourly roll-up for buckets of hours, the worker's windows, the per-minute roll-up,
    the raw calls (a source with no rows in the range falls through to the next)."""
    step = bucket_seconds(f, max_points)
    if _rollup_fits(f, by, step, 3600):
        ts = _timeseries_from_rollup(run, db, "llm_calls_1h", f, by, step, max_series)
        if ts.series:
            return ts
    agg_cond = _aggregate_source(f, by, step, window_s)
    if agg_cond is not None:
        ts = _timeseries_from_aggregates(run, db, f, by, step, window_s, agg_cond, max_series)
        if ts.series:
            return ts
    if _rollup_fits(f, by, step, 60):
        ts = _timeseries_from_rollup(run, db, "llm_calls_1m", f, by, step, max_series)
        if ts.series:
            return ts
    return _timeseries_from_calls(run, db, f, by, step, max_series)


_P95: dict[Source, str] = {
    "llm_calls_1h": (
        f"{hist_quantile_sql(0.95, 'sumForEachMerge(latency_h)')}, {hist_quantile_sql(0.95, 'sumForEachMerge(ttft_h)')}"
    ),
    "llm_calls_1m": (
        "quantilesTDigestMerge(0.5, 0.95, 0.99)(latency_q)[2], quantilesTDigestIfMerge(0.5, 0.95, 0.99)(ttft_q)[2]"
    ),
}
"""Latency and ttft p95 per roll-up: hourly rows (large digests, slow to merge and finalise) from the
log-bucketed histograms of migration 4 (within 7.2 %; NULL for hours rolled up before it), per-minute
rows (small digests, merged cheaply) from the t-digests (see bench/queries.py)."""


def _timeseries_from_rollup(run: Runner, db: str, table: Source, f: Filters, by: GroupBy, step: int, max_series: int) -> Timeseries:
    group = "''" if by == "none" else by
    conds = [f"bucket >= {ts_lit(f.start)}", f"bucket < {ts_lit(f.end)}"]
    conds += [f"{d} = {lit(v)}" for d, v in f.dims.items()]
    where = " AND ".join(conds)
    top = ""
    if by != "none":
        top = (f" AND {group} IN (SELECT {group} FROM {db}.{table} WHERE {where} GROUP BY {group} "
               f"ORDER BY countMerge(requests) DESC LIMIT {max_series})")  # fmt: skip
    sql = (
        f"SELECT toStartOfInterval(bucket, INTERVAL {step} SECOND) AS t, {group} AS g, countMerge(requests), "
        f"sumMerge(errors), {_P95[table]}, sumMerge(tokens_total), sumMerge(cost) "
        f"FROM {db}.{table} WHERE {where}{top} GROUP BY t, g ORDER BY g, t"
    )
    return _build(run(sql).rows, by, step, table)


def _build(rows: list[list[Any]], by: GroupBy, step: int, source: Source) -> Timeseries:
    out: dict[str, Series] = {}
    for t, g, req, err, p95, ttft, tok, cost in rows:
        name = str(g) if by != "none" else "all"
        s = out.get(name)
        if s is None:
            s = out[name] = Series(name=name, t=[], qps=[], error_rate=[], latency_p95_ms=[], ttft_p95_ms=[],
                                   tokens=[], cost_usd=[], requests=[])  # fmt: skip
        req = int(req)
        s.t.append(_iso(t))
        s.requests.append(req)
        s.qps.append(req / step)
        s.error_rate.append(int(err) / req if req else 0.0)
        s.latency_p95_ms.append(_float(p95))
        s.ttft_p95_ms.append(_float(ttft))
        s.tokens.append(int(tok or 0))
        s.cost_usd.append(float(cost or 0))
    return Timeseries(by=by, step_s=step, source=source, series=list(out.values()))


def _timeseries_from_aggregates(run: Runner, db: str, f: Filters, by: GroupBy, step: int, window_s: int,
                                cond: str, max_series: int) -> Timeseries:  # fmt: skip
    group = "''" if by == "none" else f"dimensions[{lit(by)}]"
    where = (
        f"kind = 'calls' AND window_s = {window_s} AND {cond} "
        f"AND window_start >= {ts_lit(f.start)} AND window_start < {ts_lit(f.end)}"
    )
    top = ""
    if by != "none":
        top = (f" AND {group} IN (SELECT {group} FROM {db}.llm_aggregates FINAL WHERE {where} "
               f"GROUP BY {group} ORDER BY sum(requests) DESC LIMIT {max_series})")  # fmt: skip
    # buckets wider than one window: p95 and TTFT p95 are the request-weighted mean of the windows'
    sql = (
        f"SELECT toStartOfInterval(window_start, INTERVAL {step} SECOND) AS t, {group} AS g, "
        "sum(requests) AS req, sum(errors) AS err, "
        "sumIf(latency_p95_ms * requests, latency_p95_ms IS NOT NULL) / nullIf(sumIf(requests, latency_p95_ms IS NOT NULL), 0), "
        "sumIf(ttft_p95_ms * requests, ttft_p95_ms IS NOT NULL) / nullIf(sumIf(requests, ttft_p95_ms IS NOT NULL), 0), "
        "sum(total_tokens), sum(cost_usd) "
        f"FROM {db}.llm_aggregates FINAL WHERE {where}{top} GROUP BY t, g ORDER BY g, t"
    )
    return _build(run(sql).rows, by, step, "llm_aggregates")


def _timeseries_from_calls(run: Runner, db: str, f: Filters, by: GroupBy, step: int, max_series: int) -> Timeseries:
    group = "''" if by == "none" else by
    where = f.calls_where()
    top = ""
    if by != "none":
        top = f" AND {group} IN (SELECT {group} FROM {db}.llm_calls FINAL WHERE {where} GROUP BY {group} ORDER BY count() DESC LIMIT {max_series})"
    sql = (
        f"SELECT toStartOfInterval(ts, INTERVAL {step} SECOND) AS t, {group} AS g, count(), sum(is_error), "
        "quantile(0.95)(latency_ms), quantile(0.95)(ttft_ms), sum(total_tokens), sum(cost_usd) "
        f"FROM {db}.llm_calls FINAL WHERE {where}{top} GROUP BY t, g ORDER BY g, t"
    )
    return _build(run(sql).rows, by, step, "llm_calls")


class Summary(BaseModel):
    requests: int
    errors: int
    error_rate: float
    qps: float
    latency_p95_ms: float | None
    ttft_p95_ms: float | None
    tokens: int
    cost_usd: float


def summary(run: Runner, db: str, f: Filters) -> Summary:
    sql = (
        "SELECT count(), sum(is_error), quantile(0.95)(latency_ms), quantile(0.95)(ttft_ms), "
        f"sum(total_tokens), sum(cost_usd) FROM {db}.llm_calls FINAL WHERE {f.calls_where()}"
    )
    req, err, p95, ttft, tok, cost = run(sql).rows[0]
    req, err = int(req), int(err or 0)
    span = max(1.0, (f.end - f.start).total_seconds())
    return Summary(requests=req, errors=err, error_rate=err / req if req else 0.0, qps=req / span,
                   latency_p95_ms=_float(p95) if req else None, ttft_p95_ms=_float(ttft) if req else None,
                   tokens=int(tok or 0), cost_usd=float(cost or 0))  # fmt: skip


class GpuSeries(BaseModel):
    name: str
    t: list[str]
    utilization_pct: list[float]
    memory_used_gib: list[float]
    memory_util_pct: list[float]
    temperature_c: list[float | None]


class GpuPanel(BaseModel):
    step_s: int
    series: list[GpuSeries]


def gpu(run: Runner, db: str, f: Filters, max_points: int) -> GpuPanel:
    step = bucket_seconds(f, max_points)
    sql = (
        f"SELECT toStartOfInterval(ts, INTERVAL {step} SECOND) AS t, concat(host, ' gpu', toString(gpu_index)) AS g, "
        "avg(utilization_gpu_pct), max(memory_used_bytes), avg(utilization_memory_pct), max(temperature_c) "
        f"FROM {db}.gpu_samples FINAL WHERE ts >= {ts_lit(f.start)} AND ts < {ts_lit(f.end)} "
        "GROUP BY t, g ORDER BY g, t"
    )
    out: dict[str, GpuSeries] = {}
    for t, g, util, mem, memu, temp in run(sql).rows:
        s = out.setdefault(g, GpuSeries(name=g, t=[], utilization_pct=[], memory_used_gib=[], memory_util_pct=[], temperature_c=[]))
        s.t.append(_iso(t))
        s.utilization_pct.append(float(util))
        s.memory_used_gib.append(int(mem) / 2**30)
        s.memory_util_pct.append(float(memu))
        s.temperature_c.append(_float(temp))
    return GpuPanel(step_s=step, series=list(out.values()))


class HostSeries(BaseModel):
    name: str
    t: list[str]
    cpu_pct: list[float]
    memory_used_pct: list[float]
    load1: list[float | None]


class HostPanel(BaseModel):
    step_s: int
    series: list[HostSeries]


def host(run: Runner, db: str, f: Filters, max_points: int) -> HostPanel:
    """CPU %, memory used % (peak of the bucket: the figure an out-of-memory kill follows) and the
    1-minute load average of each host beside the GPUs, from host_samples."""
    step = bucket_seconds(f, max_points)
    sql = (
        f"SELECT toStartOfInterval(ts, INTERVAL {step} SECOND) AS t, host, avg(cpu_pct), max(memory_used_pct), "
        f"avg(load1) FROM {db}.host_samples FINAL WHERE ts >= {ts_lit(f.start)} AND ts < {ts_lit(f.end)} "
        "GROUP BY t, host ORDER BY host, t"
    )
    out: dict[str, HostSeries] = {}
    for t, h, cpu, mem, load in run(sql).rows:
        s = out.setdefault(h, HostSeries(name=h, t=[], cpu_pct=[], memory_used_pct=[], load1=[]))
        s.t.append(_iso(t))
        s.cpu_pct.append(float(cpu))
        s.memory_used_pct.append(float(mem))
        s.load1.append(_float(load))
    return HostPanel(step_s=step, series=list(out.values()))


class AlertRow(BaseModel):
    alert_id: str
    fingerprint: str
    rule: str
    severity: str
    state: str
    active: bool
    metric: str
    value: float | None
    threshold: float | None
    baseline: float | None
    dimensions: dict[str, str]
    window_start: str
    window_end: str
    started_at: str
    ts: str
    summary: str
    link: str
    expected_low: float | None = None
    expected_high: float | None = None
    evidence: dict[str, str | float] = Field(default_factory=dict, description="the numbers the rule decided on")
    why: str = Field(default="", description="the evidence in words (llmpulse.schemas.alert.evidence_text)")
    actions: list[ActionRow] = Field(default_factory=list, description="actions taken on this alert's incident")


def alert_link(fingerprint: str, window_start: str, window_end: str, dims: dict[str, str]) -> str:
    """The same link the notifier puts in Slack messages (llmpulse.sinks.notifier.blocks)."""
    from urllib.parse import urlencode

    def short(iso: str) -> str:
        return iso.split(".")[0].rstrip("Z") + "Z"

    params = [("alert", fingerprint), ("from", short(window_start)), ("to", short(window_end))]
    params += [(k, v) for k, v in sorted(dims.items()) if k not in ("alert", "from", "to")]
    return "/?" + urlencode(params)


class ActionRow(BaseModel):
    action_id: str
    kind: str
    status: str
    actor: str
    target: dict[str, str]
    ts: str


# the order of an action's life: a later stage wins whatever the arrival order (llmpulse.actions.model)
_ACTION_RANK = "['proposed', 'pending', 'approved', 'applied', 'rejected', 'expired', 'undone', 'failed']"


def actions_of(run: Runner, db: str, fingerprints: set[str]) -> dict[str, list[ActionRow]]:
    """Each fingerprint's actions at their latest stage (the `actions` table, one row per step)."""
    if not fingerprints:
        return {}
    fps = ", ".join(lit(fp) for fp in sorted(fingerprints))
    sql = (
        f"SELECT alert_fingerprint, action_id, any(kind), "
        f"argMax(status, (indexOf({_ACTION_RANK}, status), ts)), "
        f"argMax(actor, (indexOf({_ACTION_RANK}, status), ts)), any(target), max(ts) "
        f"FROM {db}.actions FINAL WHERE alert_fingerprint IN ({fps}) "
        f"GROUP BY alert_fingerprint, action_id ORDER BY max(ts) DESC LIMIT 500"
    )
    out: dict[str, list[ActionRow]] = {}
    for fp, aid, kind, status, actor, target, ts in run(sql).rows:
        out.setdefault(str(fp), []).append(ActionRow(
            action_id=str(aid), kind=str(kind), status=str(status), actor=str(actor),
            target={str(k): str(v) for k, v in (target or {}).items()}, ts=_iso(ts),
        ))  # fmt: skip
    return out


def _evidence(raw: Any) -> dict[str, str | float]:
    """The `evidence` column (JSON text, '' when none; rows before migration 7 have none)."""
    try:
        data = json.loads(raw) if raw else {}
    except (TypeError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): v if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v) for k, v in data.items()}


class AlertsPanel(BaseModel):
    active: list[AlertRow]
    recent: list[AlertRow]
    focus: list[AlertRow] = Field(default_factory=list, description="the latest events of the asked fingerprint")


def alerts(run: Runner, db: str, f: Filters, limit: int = 200, fingerprint: str | None = None) -> AlertsPanel:
    cols = ("alert_id, fingerprint, rule, severity, state, metric, value, threshold, baseline, dimensions, "
            "window_start, window_end, started_at, ts, summary, expected_low, expected_high, evidence")  # fmt: skip
    # active: the latest event of each fingerprint is still firing (whatever the range)
    active_sql = (
        f"SELECT {cols} FROM {db}.alerts FINAL WHERE (fingerprint, ts) IN "
        f"(SELECT fingerprint, max(ts) FROM {db}.alerts FINAL WHERE ts < {ts_lit(f.end)} GROUP BY fingerprint) "
        f"AND state = 'firing' ORDER BY ts DESC LIMIT {limit}"
    )
    recent_sql = (
        f"SELECT {cols} FROM {db}.alerts FINAL WHERE ts >= {ts_lit(f.start)} AND ts < {ts_lit(f.end)} "
        f"ORDER BY ts DESC LIMIT {limit}"
    )

    def rows(sql: str, active: bool) -> list[AlertRow]:
        out = []
        for r in run(sql).rows:
            d = dict(zip(("alert_id", "fingerprint", "rule", "severity", "state", "metric", "value", "threshold",
                          "baseline", "dimensions", "window_start", "window_end", "started_at", "ts", "summary",
                          "expected_low", "expected_high", "evidence"), r, strict=True))  # fmt: skip
            for k in ("window_start", "window_end", "started_at", "ts"):
                d[k] = _iso(d[k])
            dims = {str(k): str(v) for k, v in (d["dimensions"] or {}).items()}
            d["dimensions"] = dims
            for k in ("value", "threshold", "baseline", "expected_low", "expected_high"):
                d[k] = _float(d[k])
            d["evidence"] = _evidence(d["evidence"])
            d["why"] = evidence_text(d["evidence"])
            out.append(AlertRow(**d, active=active, link=alert_link(d["fingerprint"], d["window_start"], d["window_end"], dims)))
        return out

    active_rows = rows(active_sql, True)
    firing = {a.fingerprint for a in active_rows}
    recent = rows(recent_sql, False)
    for a in recent:
        a.active = a.fingerprint in firing and a.state == "firing"
    focus: list[AlertRow] = []
    if fingerprint:
        focus = rows(f"SELECT {cols} FROM {db}.alerts FINAL WHERE fingerprint = {lit(fingerprint)} ORDER BY ts DESC LIMIT 10", False)
        for a in focus:
            a.active = a.fingerprint in firing and a.state == "firing"
    taken = actions_of(run, db, {a.fingerprint for a in (*active_rows, *recent, *focus)})
    for a in (*active_rows, *recent, *focus):
        a.actions = taken.get(a.fingerprint, [])
    return AlertsPanel(active=active_rows, recent=recent, focus=focus)


CALL_COLUMNS = ("event_id", "ts", "model", "app", "user", "status_code", "error_type", "latency_ms",
                "ttft_ms", "total_tokens", "cost_usd", "streamed")  # fmt: skip


class CallsPage(BaseModel):
    columns: list[str]
    rows: list[list[Any]]
    total: int


def calls(run: Runner, db: str, f: Filters, limit: int, offset: int = 0) -> CallsPage:
    where = f.calls_where()
    sql = (
        f"SELECT {', '.join(CALL_COLUMNS)} FROM {db}.llm_calls FINAL WHERE {where} "
        f"ORDER BY ts DESC, event_id LIMIT {int(limit)} OFFSET {int(offset)}"
    )
    res = run(sql)
    total = int(run(f"SELECT count() FROM {db}.llm_calls FINAL WHERE {where}").rows[0][0])
    rows = [[_iso(v) if c == "ts" else v for c, v in zip(res.columns, r, strict=True)] for r in res.rows]
    return CallsPage(columns=list(res.columns), rows=rows, total=total)


class CallDetail(BaseModel):
    fields: dict[str, Any]
    captured: bool
    prompt: str | None
    response: str | None


def call_detail(run: Runner, db: str, event_id: str) -> CallDetail | None:
    res = run(f"SELECT * EXCEPT (inserted_at) FROM {db}.llm_calls FINAL WHERE event_id = {lit(event_id)} LIMIT 1")
    if not res.rows:
        return None
    d = dict(zip(res.columns, res.rows[0], strict=True))
    prompt, response = d.pop("prompt", None), d.pop("response", None)
    d["ts"] = _iso(d["ts"])
    return CallDetail(fields=d, captured=prompt is not None or response is not None, prompt=prompt, response=response)


class Options(BaseModel):
    model: list[str]
    app: list[str]
    user: list[str]
    error_type: list[str]
    status_code: list[int]


def options(run: Runner, db: str, f: Filters, limit: int = 200) -> Options:
    where = f"ts >= {ts_lit(f.start)} AND ts < {ts_lit(f.end)}"
    out: dict[str, list[Any]] = {}
    for col in ("model", "app", "user", "error_type", "status_code"):
        rows = run(f"SELECT {col} FROM {db}.llm_calls WHERE {where} GROUP BY {col} ORDER BY count() DESC LIMIT {limit}").rows
        out[col] = sorted(r[0] for r in rows if r[0] not in ("", None))
    return Options(**out)
