"""Tables of database `llmpulse`, as versioned migrations.

Engines and keys follow the queries people run: a time range plus model, app, user or
status. Raw tables are ReplacingMergeTree keyed by the event's id, aggregates by the
window key, so a re-delivered row replaces its twin when parts merge; exact figures
read with `FINAL` (or `argMax` / `uniqExact(event_id)`). Costs are Decimal, never floats.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmpulse.config.clickhouse import ClickHouseConfig


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


def _engine(cfg: ClickHouseConfig, engine: str, table: str) -> str:
    """The engine, made Replicated when a cluster is configured."""
    if not cfg.cluster:
        return engine
    name, _, args = engine.partition("(")
    args = args.rstrip(")")
    path = f"'/clickhouse/tables/{{shard}}/{cfg.database}/{table}', '{{replica}}'"
    return f"Replicated{name}({path}{', ' + args if args else ''})"


def _on_cluster(cfg: ClickHouseConfig) -> str:
    return f" ON CLUSTER {cfg.cluster}" if cfg.cluster else ""


def migrations(cfg: ClickHouseConfig) -> list[Migration]:
    db = cfg.database
    oc = _on_cluster(cfg)
    r = cfg.retention_days
    def E(engine: str, table: str) -> str:
        return _engine(cfg, engine, table)

    return [
        Migration(
            1,
            "raw events, aggregates, alerts, dead letters",
            (
                f"CREATE DATABASE IF NOT EXISTS {db}{oc}",
                f"""CREATE TABLE IF NOT EXISTS {db}.llm_calls{oc} (
                    event_id String,
                    ts DateTime64(3, 'UTC'),
                    source LowCardinality(String),
                    provider LowCardinality(String),
                    model LowCardinality(String),
                    response_model LowCardinality(String),
                    operation LowCardinality(String),
                    app LowCardinality(String),
                    user String,
                    api_key_hash String,
                    status_code UInt16,
                    error_type LowCardinality(String),
                    is_error UInt8,
                    latency_ms Float64,
                    ttft_ms Nullable(Float64),
                    streamed Bool,
                    prompt_tokens UInt32,
                    completion_tokens UInt32,
                    total_tokens UInt32,
                    cached_tokens UInt32,
                    reasoning_tokens UInt32,
                    tokens_estimated Bool,
                    cost_usd Nullable(Decimal(18, 9)),
                    prompt Nullable(String),
                    response Nullable(String),
                    inserted_at DateTime64(3, 'UTC') DEFAULT now64(3)
                ) ENGINE = {E("ReplacingMergeTree", "llm_calls")}
                PARTITION BY toYYYYMMDD(ts)
                ORDER BY (model, app, ts, event_id)
                TTL toDateTime(ts) + INTERVAL {r.llm_calls} DAY""",
                f"""CREATE TABLE IF NOT EXISTS {db}.llm_aggregates{oc} (
                    aggregate_id String,
                    kind LowCardinality(String),
                    window_s UInt32,
                    window_start DateTime64(3, 'UTC'),
                    window_end DateTime64(3, 'UTC'),
                    dims_key String,
                    dimensions Map(LowCardinality(String), String),
                    requests UInt64,
                    errors UInt64,
                    errors_by_type Map(LowCardinality(String), UInt64),
                    qps Float64,
                    error_rate Float64,
                    success_rate Float64,
                    latency_sum_ms Float64,
                    latency_avg_ms Nullable(Float64),
                    latency_p50_ms Nullable(Float64),
                    latency_p95_ms Nullable(Float64),
                    latency_p99_ms Nullable(Float64),
                    ttft_p95_ms Nullable(Float64),
                    prompt_tokens UInt64,
                    completion_tokens UInt64,
                    total_tokens UInt64,
                    cost_usd Decimal(18, 9),
                    unpriced_requests UInt64,
                    feedback_count UInt64,
                    intent_accuracy Nullable(Float64),
                    relevance_avg Nullable(Float64),
                    samples UInt64,
                    gpu_util_avg_pct Nullable(Float64),
                    gpu_util_max_pct Nullable(Float64),
                    memory_used_max_bytes Nullable(UInt64),
                    memory_util_avg_pct Nullable(Float64),
                    temperature_max_c Nullable(Float64),
                    power_avg_w Nullable(Float64),
                    revision UInt32,
                    inserted_at DateTime64(3, 'UTC') DEFAULT now64(3)
                ) ENGINE = {E("ReplacingMergeTree(revision)", "llm_aggregates")}
                PARTITION BY toYYYYMM(window_start)
                ORDER BY (kind, window_s, dims_key, window_start)
                TTL toDateTime(window_start) + INTERVAL {r.llm_aggregates} DAY""",
                f"""CREATE TABLE IF NOT EXISTS {db}.gpu_samples{oc} (
                    event_id String,
                    ts DateTime64(3, 'UTC'),
                    host LowCardinality(String),
                    gpu_index UInt16,
                    gpu_uuid LowCardinality(String),
                    name LowCardinality(String),
                    utilization_gpu_pct Float32,
                    utilization_memory_pct Float32,
                    memory_used_bytes UInt64,
                    memory_total_bytes UInt64,
                    temperature_c Nullable(Float32),
                    power_draw_w Nullable(Float32),
                    power_limit_w Nullable(Float32),
                    processes String
                ) ENGINE = {E("ReplacingMergeTree", "gpu_samples")}
                PARTITION BY toYYYYMMDD(ts)
                ORDER BY (host, gpu_index, ts, event_id)
                TTL toDateTime(ts) + INTERVAL {r.gpu_samples} DAY""",
                f"""CREATE TABLE IF NOT EXISTS {db}.feedback{oc} (
                    event_id String,
                    call_event_id String,
                    ts DateTime64(3, 'UTC'),
                    intent_correct Nullable(Bool),
                    relevance Nullable(Float32),
                    model LowCardinality(String),
                    app LowCardinality(String),
                    user String,
                    comment Nullable(String)
                ) ENGINE = {E("ReplacingMergeTree", "feedback")}
                PARTITION BY toYYYYMM(ts)
                ORDER BY (app, ts, event_id)
                TTL toDateTime(ts) + INTERVAL {r.feedback} DAY""",
                f"""CREATE TABLE IF NOT EXISTS {db}.alerts{oc} (
                    alert_id String,
                    fingerprint String,
                    rule LowCardinality(String),
                    severity LowCardinality(String),
                    state LowCardinality(String),
                    metric LowCardinality(String),
                    value Nullable(Float64),
                    threshold Nullable(Float64),
                    baseline Nullable(Float64),
                    dimensions Map(LowCardinality(String), String),
                    window_start DateTime64(3, 'UTC'),
                    window_end DateTime64(3, 'UTC'),
                    started_at DateTime64(3, 'UTC'),
                    ts DateTime64(3, 'UTC'),
                    summary String,
                    root_cause String
                ) ENGINE = {E("ReplacingMergeTree", "alerts")}
                PARTITION BY toYYYYMM(ts)
                ORDER BY (fingerprint, ts, alert_id)
                TTL toDateTime(ts) + INTERVAL {r.alerts} DAY""",
                f"""CREATE TABLE IF NOT EXISTS {db}.deadletter{oc} (
                    dead_letter_id String,
                    ts DateTime64(3, 'UTC'),
                    kind LowCardinality(String),
                    reason String,
                    source LowCardinality(String),
                    partition Nullable(Int32),
                    offset Nullable(Int64),
                    payload String,
                    payload_encoding LowCardinality(String)
                ) ENGINE = {E("ReplacingMergeTree", "deadletter")}
                PARTITION BY toYYYYMM(ts)
                ORDER BY (ts, dead_letter_id)
                TTL toDateTime(ts) + INTERVAL {r.deadletter} DAY""",
            ),
        ),
        Migration(
            2,
            "per-minute and per-hour roll-ups of llm_calls, actions, sink intents, insert deduplication",
            (
                *_dedup_settings(cfg, ("llm_calls", "llm_aggregates", "gpu_samples", "feedback", "alerts", "deadletter")),
                *(stmt for bucket in ROLLUPS for stmt in _rollup(cfg, bucket)),
                f"""CREATE TABLE IF NOT EXISTS {db}.actions{oc} (
                    event_id String,
                    action_id String,
                    ts DateTime64(3, 'UTC'),
                    status LowCardinality(String),
                    kind LowCardinality(String),
                    rule LowCardinality(String),
                    alert_fingerprint String,
                    alert_id String,
                    target Map(LowCardinality(String), String),
                    params String,
                    expires_at Nullable(DateTime64(3, 'UTC')),
                    actor LowCardinality(String),
                    reason String
                ) ENGINE = {E("ReplacingMergeTree", "actions")}
                PARTITION BY toYYYYMM(ts)
                ORDER BY (action_id, ts, event_id)
                TTL toDateTime(ts) + INTERVAL {r.actions} DAY{_dedup_clause(cfg)}""",
                *_distributed(cfg),
                f"""CREATE TABLE IF NOT EXISTS {db}.sink_intents{oc} (
                    table LowCardinality(String),
                    token String,
                    topic String,
                    ranges Array(Tuple(partition Int32, first Int64, last Int64)),
                    rows UInt32,
                    ts DateTime64(3, 'UTC') DEFAULT now64(3)
                ) ENGINE = {E("ReplacingMergeTree", "sink_intents")}
                ORDER BY (topic, token)
                TTL toDateTime(ts) + INTERVAL 7 DAY""",
            ),
        ),
        Migration(
            3,
            "roll-ups of all traffic per minute and per hour (no dimensions)",
            (
                *(stmt for bucket in ROLLUPS for stmt in _rollup(cfg, bucket, dims=False)),
                *_distributed(cfg, ("llm_calls_1m_total", "llm_calls_1h_total")),
            ),
        ),
        Migration(
            4,
            "log-bucketed latency and ttft histograms in the roll-ups",
            tuple(stmt for bucket in ROLLUPS for dims in (True, False) for stmt in _histograms(cfg, bucket, dims)),
        ),
        Migration(
            5,
            "chained roll-ups (only llm_calls_1m reads llm_calls), plain columns on llm_calls_1m_total",
            (*_chain(cfg), *_plain_total(cfg)),
        ),
        Migration(
            6,
            "host_samples (CPU, memory, load beside the GPUs), host figures on llm_aggregates",
            _host_samples(cfg),
        ),
        Migration(
            7,
            "alert evidence: expected band and the numbers a rule decided on",
            _alert_evidence(cfg),
        ),
        Migration(
            8,
            "sink intents record the ids a batch of llm_calls leaves out (each event id once in the roll-ups)",
            (
                # a batch recorded before this migration reads dedup_by_id = 0: rebuilt whole, as it was written
                f"ALTER TABLE {db}.sink_intents{oc} ADD COLUMN IF NOT EXISTS skipped_ids Array(String) DEFAULT []",
                f"ALTER TABLE {db}.sink_intents{oc} ADD COLUMN IF NOT EXISTS dedup_by_id UInt8 DEFAULT 0",
            ),
        ),
    ]


ROLLUPS = {"1m": "toStartOfMinute", "1h": "toStartOfHour"}
"""Roll-up tables llm_calls_<bucket>: AggregatingMergeTree filled by a materialized view."""

QUANTILES = "0.5, 0.95, 0.99"
"""Levels kept by the latency and ttft digests: read them with quantilesTDigestMerge(0.5, 0.95, 0.99)."""


def _dedup_clause(cfg: ClickHouseConfig) -> str:
    # Replicated tables deduplicate inserts by default; plain MergeTree only within this window
    return "" if cfg.cluster else "\n                SETTINGS non_replicated_deduplication_window = 1000"


def _dedup_settings(cfg: ClickHouseConfig, tables: tuple[str, ...]) -> list[str]:
    if cfg.cluster:
        return []
    return [
        f"ALTER TABLE {cfg.database}.{t} MODIFY SETTING non_replicated_deduplication_window = 1000"
        for t in tables
    ]


DISTRIBUTED = {
    "llm_calls": "cityHash64(event_id)",
    "llm_calls_1m": "rand()",
    "llm_calls_1h": "rand()",
    "llm_aggregates": "cityHash64(aggregate_id)",
    "gpu_samples": "cityHash64(host)",
    "host_samples": "cityHash64(host)",
    "feedback": "cityHash64(event_id)",
    "alerts": "cityHash64(fingerprint)",
    "deadletter": "cityHash64(dead_letter_id)",
    "actions": "cityHash64(action_id)",
}
"""Cluster only: `<table>_all` Distributed tables over the shards' local tables, for queries."""


def _distributed(cfg: ClickHouseConfig, tables: tuple[str, ...] = tuple(DISTRIBUTED)) -> list[str]:
    if not cfg.cluster:
        return []
    db = cfg.database
    return [
        f"CREATE TABLE IF NOT EXISTS {db}.{t}_all ON CLUSTER {cfg.cluster} AS {db}.{t} "
        f"ENGINE = Distributed({cfg.cluster}, {db}, {t}, {DISTRIBUTED.get(t, 'rand()')})"
        for t in tables
    ]


def _rollup(cfg: ClickHouseConfig, bucket: str, dims: bool = True) -> list[str]:
    """A roll-up table and its view: by (bucket, model, provider, app), or by bucket alone
    (`llm_calls_<bucket>_total`, for charts of all traffic: a 30-day per-minute chart
    then merges 43,200 states instead of one per model and app and minute)."""
    db = cfg.database
    oc = _on_cluster(cfg)
    table = f"llm_calls_{bucket}" + ("" if dims else "_total")
    days = getattr(cfg.retention_days, f"llm_calls_{bucket}")
    fn = ROLLUPS[bucket]
    dim_cols = "model LowCardinality(String),\n            provider LowCardinality(String),\n            app LowCardinality(String),\n            " if dims else ""
    key = "bucket, model, provider, app" if dims else "bucket"
    return [
        f"""CREATE TABLE IF NOT EXISTS {db}.{table}{oc} (
            bucket DateTime('UTC'),
            {dim_cols}requests AggregateFunction(count),
            errors AggregateFunction(sum, UInt64),
            latency_sum_ms AggregateFunction(sum, Float64),
            latency_q AggregateFunction(quantilesTDigest({QUANTILES}), Float64),
            ttft_q AggregateFunction(quantilesTDigestIf({QUANTILES}), Float64, UInt8),
            tokens_prompt AggregateFunction(sum, UInt64),
            tokens_completion AggregateFunction(sum, UInt64),
            tokens_total AggregateFunction(sum, UInt64),
            cost AggregateFunction(sum, Decimal(18, 9)),
            unpriced AggregateFunction(sum, UInt64)
        ) ENGINE = {_engine(cfg, "AggregatingMergeTree", table)}
        PARTITION BY toYYYYMM(bucket)
        ORDER BY ({key})
        TTL bucket + INTERVAL {days} DAY{_dedup_clause(cfg)}""",
        f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{table}_mv{oc} TO {db}.{table} AS
        SELECT
            {fn}(ts, 'UTC') AS bucket{', model, provider, app' if dims else ''},
            countState() AS requests,
            sumState(toUInt64(is_error)) AS errors,
            sumState(latency_ms) AS latency_sum_ms,
            quantilesTDigestState({QUANTILES})(latency_ms) AS latency_q,
            quantilesTDigestIfState({QUANTILES})(ifNull(ttft_ms, 0.), toUInt8(isNotNull(ttft_ms))) AS ttft_q,
            sumState(toUInt64(prompt_tokens)) AS tokens_prompt,
            sumState(toUInt64(completion_tokens)) AS tokens_completion,
            sumState(toUInt64(total_tokens)) AS tokens_total,
            sumState(ifNull(cost_usd, toDecimal64(0, 9))) AS cost,
            sumState(toUInt64(isNull(cost_usd))) AS unpriced
        FROM {db}.llm_calls
        GROUP BY {key}""",
    ]


HOST_AGGREGATE_COLUMNS = (
    "host_cpu_avg_pct", "host_cpu_max_pct", "host_memory_avg_pct", "host_memory_max_pct", "host_load1_avg",
)  # fmt: skip
"""Migration 6: the figures of `host` windows on llm_aggregates (Nullable(Float64), NULL on other kinds)."""


def _host_samples(cfg: ClickHouseConfig) -> tuple[str, ...]:
    """Migration 6: one row per HostSample, keyed like gpu_samples (by host and time, replaced by
    event id), and the host window figures on llm_aggregates."""
    db = cfg.database
    oc = _on_cluster(cfg)
    tables = ["llm_aggregates"] + (["llm_aggregates_all"] if cfg.cluster else [])
    return (
        f"""CREATE TABLE IF NOT EXISTS {db}.host_samples{oc} (
            event_id String,
            ts DateTime64(3, 'UTC'),
            host LowCardinality(String),
            cpu_count Nullable(UInt32),
            cpu_pct Float32,
            memory_used_bytes UInt64,
            memory_total_bytes UInt64,
            memory_used_pct Float32,
            load1 Nullable(Float32),
            load5 Nullable(Float32),
            load15 Nullable(Float32)
        ) ENGINE = {_engine(cfg, "ReplacingMergeTree", "host_samples")}
        PARTITION BY toYYYYMMDD(ts)
        ORDER BY (host, ts, event_id)
        TTL toDateTime(ts) + INTERVAL {cfg.retention_days.host_samples} DAY{_dedup_clause(cfg)}""",
        *(f"ALTER TABLE {db}.{t}{oc} ADD COLUMN IF NOT EXISTS {c} Nullable(Float64)"
          for t in tables for c in HOST_AGGREGATE_COLUMNS),
        *_distributed(cfg, ("host_samples",)),
    )  # fmt: skip


ALERT_EVIDENCE_COLUMNS = (
    ("expected_low", "Nullable(Float64)"),
    ("expected_high", "Nullable(Float64)"),
    ("evidence", "String"),
)
"""Migration 7: the band a healthy value lies in, and the evidence (JSON: n, count, p_value,
burn rates, error budget remaining...) of each alert; older rows read NULL / ''."""


def _alert_evidence(cfg: ClickHouseConfig) -> tuple[str, ...]:
    db = cfg.database
    oc = _on_cluster(cfg)
    tables = ["alerts"] + (["alerts_all"] if cfg.cluster else [])
    return tuple(
        f"ALTER TABLE {db}.{t}{oc} ADD COLUMN IF NOT EXISTS {c} {kind}"
        for t in tables
        for c, kind in ALERT_EVIDENCE_COLUMNS
    )


def migrations_table_ddl(cfg: ClickHouseConfig) -> str:
    return f"""CREATE TABLE IF NOT EXISTS {cfg.database}.schema_migrations{_on_cluster(cfg)} (
        version UInt32,
        name String,
        applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
    ) ENGINE = {_engine(cfg, "ReplacingMergeTree", "schema_migrations")} ORDER BY version"""


HIST_RATIO = 1.15
"""Histogram bucket i (0-based) of `latency_h` / `ttft_h` counts values in [HIST_RATIO**i, HIST_RATIO**(i+1)) ms;
bucket 0 also takes everything under 1 ms, the last one everything from HIST_RATIO**(HIST_BUCKETS-1) ms (~9.8 min).
A call adds a one-hot array as long as its bucket index (~55 for 2 s), and merging costs per element: a
coarser ratio makes the 30-day charts faster, a finer one the quantiles closer (1.11: 5.4 %, arrays ~40 % longer)."""
HIST_BUCKETS = 96
HIST_REL_ERROR = HIST_RATIO**0.5 - 1
"""Largest relative error of a quantile read with `hist_quantile_sql` (the bucket's geometric middle),
for values between 1 ms and HIST_RATIO**(HIST_BUCKETS-1) ms: ~7.2 %."""


def _hist_index(value: str) -> str:
    return f"toUInt32(least({HIST_BUCKETS - 1}, greatest(0, floor(log(greatest({value}, 1.)) / log({HIST_RATIO})))))"


def _hist_one(value: str) -> str:
    """A row's histogram: zeros up to its bucket, then 1 (sumForEach pads shorter arrays with zeros)."""
    return f"arrayPushBack(arrayWithConstant({_hist_index(value)}, toUInt64(0)), toUInt64(1))"


def hist_quantile_sql(level: float, hist: str) -> str:
    """SQL for the `level` quantile (nearest rank) of a merged histogram `hist` (e.g.
    `sumForEachMerge(latency_h)`), as the geometric middle of the bucket holding that rank;
    NULL where the histogram is empty (no calls, or buckets rolled up before migration 4)."""
    rank = f"arrayWithConstant(length({hist}), {level} * arraySum({hist}))"
    index = f"arrayFirstIndex((c, r) -> c >= r, arrayCumSum({hist}), {rank})"
    return f"if(empty({hist}), NULL, pow({HIST_RATIO}, {index} - 0.5))"


def _histograms(cfg: ClickHouseConfig, bucket: str, dims: bool) -> list[str]:
    """Migration 4: columns `latency_h` and `ttft_h` (AggregateFunction(sumForEach, Array(UInt64)),
    a fixed log-bucketed histogram, see HIST_RATIO) on a roll-up, and its view rewritten in place
    (ALTER ... MODIFY QUERY, so no insert is lost or counted twice while it changes). Buckets
    rolled up before keep empty histograms (no backfill)."""
    db = cfg.database
    oc = _on_cluster(cfg)
    table = f"llm_calls_{bucket}" + ("" if dims else "_total")
    fn = ROLLUPS[bucket]
    key = "bucket, model, provider, app" if dims else "bucket"
    cols = ("latency_h", "ttft_h")
    tables = [table] + ([f"{table}_all"] if cfg.cluster else [])
    return [
        *(f"ALTER TABLE {db}.{t}{oc} ADD COLUMN IF NOT EXISTS {c} AggregateFunction(sumForEach, Array(UInt64))"
          for t in tables for c in cols),
        f"""ALTER TABLE {db}.{table}_mv{oc} MODIFY QUERY
        SELECT
            {fn}(ts, 'UTC') AS bucket{', model, provider, app' if dims else ''},
            countState() AS requests,
            sumState(toUInt64(is_error)) AS errors,
            sumState(latency_ms) AS latency_sum_ms,
            quantilesTDigestState({QUANTILES})(latency_ms) AS latency_q,
            quantilesTDigestIfState({QUANTILES})(ifNull(ttft_ms, 0.), toUInt8(isNotNull(ttft_ms))) AS ttft_q,
            sumState(toUInt64(prompt_tokens)) AS tokens_prompt,
            sumState(toUInt64(completion_tokens)) AS tokens_completion,
            sumState(toUInt64(total_tokens)) AS tokens_total,
            sumState(ifNull(cost_usd, toDecimal64(0, 9))) AS cost,
            sumState(toUInt64(isNull(cost_usd))) AS unpriced,
            sumForEachState({_hist_one('latency_ms')}) AS latency_h,
            sumForEachState(if(isNull(ttft_ms), CAST([], 'Array(UInt64)'), {_hist_one('assumeNotNull(ttft_ms)')})) AS ttft_h
        FROM {db}.llm_calls
        GROUP BY {key}""",
    ]


CHAIN = {
    "llm_calls_1m": ("llm_calls", "toStartOfMinute", True),
    "llm_calls_1m_total": ("llm_calls_1m", "toStartOfMinute", False),
    "llm_calls_1h": ("llm_calls_1m", "toStartOfHour", True),
    "llm_calls_1h_total": ("llm_calls_1m_total", "toStartOfHour", False),
}
"""Migration 5: roll-up table -> (the table its view reads, bucket function, by model/provider/app).
Only `llm_calls_1m` reads raw inserts; the others merge the states of the blocks inserted into
the roll-up they read (a few hundred rows per raw batch), so a raw INSERT runs one view over its
rows instead of four. Listed in the order migration 5 changes them (sources first)."""


def _hist_resample(value: str, nullable: bool = False) -> str:
    """A group's histogram of `value` (NULLs left out), trailing zeros cut: countResample
    counts each row into its bucket in O(1), where a one-hot array per row costs one
    sumForEach step per element; `initializeAggregation` makes the array a sumForEach state."""
    key = _hist_index(value)
    if nullable:  # bucket HIST_BUCKETS is out of the resample range: not counted
        key = f"if(isNull({value}), {HIST_BUCKETS}, {_hist_index(f'assumeNotNull({value})')})"
    h = f"countResample(0, {HIST_BUCKETS}, 1)({key})"
    return f"initializeAggregation('sumForEachState', arrayResize({h}, arrayLastIndex(x -> x > 0, {h})))"


def rollup_view_query(cfg: ClickHouseConfig, table: str, source: str | None = None) -> str:
    """The SELECT of the view that fills roll-up `table` (migration 5 on): from raw calls for
    `llm_calls_1m`, from another roll-up's inserted states (-MergeState) for the others.
    `source` reads a subquery instead of the view's table (rollup_audit.py writes a lost block
    again through the same SELECT)."""
    db = cfg.database
    src, fn, dims = CHAIN[table]
    read = source or f"{db}.{src}"
    key = "bucket, model, provider, app" if dims else "bucket"
    if src == "llm_calls":
        return f"""SELECT
            {fn}(ts, 'UTC') AS bucket, model, provider, app,
            countState() AS requests,
            sumState(toUInt64(is_error)) AS errors,
            sumState(latency_ms) AS latency_sum_ms,
            quantilesTDigestState({QUANTILES})(latency_ms) AS latency_q,
            quantilesTDigestIfState({QUANTILES})(ifNull(ttft_ms, 0.), toUInt8(isNotNull(ttft_ms))) AS ttft_q,
            sumState(toUInt64(prompt_tokens)) AS tokens_prompt,
            sumState(toUInt64(completion_tokens)) AS tokens_completion,
            sumState(toUInt64(total_tokens)) AS tokens_total,
            sumState(ifNull(cost_usd, toDecimal64(0, 9))) AS cost,
            sumState(toUInt64(isNull(cost_usd))) AS unpriced,
            {_hist_resample('latency_ms')} AS latency_h,
            {_hist_resample('ttft_ms', nullable=True)} AS ttft_h
        FROM {read}
        GROUP BY {key}"""
    return f"""SELECT
            {fn}(bucket) AS bucket{', model, provider, app' if dims else ''},
            countMergeState(requests) AS requests,
            sumMergeState(errors) AS errors,
            sumMergeState(latency_sum_ms) AS latency_sum_ms,
            quantilesTDigestMergeState({QUANTILES})(latency_q) AS latency_q,
            quantilesTDigestIfMergeState({QUANTILES})(ttft_q) AS ttft_q,
            sumMergeState(tokens_prompt) AS tokens_prompt,
            sumMergeState(tokens_completion) AS tokens_completion,
            sumMergeState(tokens_total) AS tokens_total,
            sumMergeState(cost) AS cost,
            sumMergeState(unpriced) AS unpriced,
            sumForEachMergeState(latency_h) AS latency_h,
            sumForEachMergeState(ttft_h) AS ttft_h
        FROM {read}
        GROUP BY {key}"""


def _chain(cfg: ClickHouseConfig) -> tuple[str, ...]:
    """Each view rewritten in place (ALTER ... MODIFY QUERY also moves the view to its new
    source table), so there is no moment without a view; running it twice changes nothing."""
    oc = _on_cluster(cfg)
    return tuple(f"ALTER TABLE {cfg.database}.{t}_mv{oc} MODIFY QUERY\n        {rollup_view_query(cfg, t)}" for t in CHAIN)


PLAIN_TOTAL = {
    "requests_n": ("SimpleAggregateFunction(sum, UInt64)", "finalizeAggregation(requests)"),
    "errors_n": ("SimpleAggregateFunction(sum, UInt64)", "finalizeAggregation(errors)"),
    "latency_hist": (
        "SimpleAggregateFunction(sumMap, Tuple(Array(UInt8), Array(UInt64)))",
        "(arrayMap(i -> toUInt8(i - 1), arrayFilter((i, c) -> c > 0, arrayEnumerate(finalizeAggregation(latency_h)),"
        " finalizeAggregation(latency_h))), arrayFilter(c -> c > 0, finalizeAggregation(latency_h)))",
    ),
}
"""Migration 5: plain (SimpleAggregateFunction) twins of `requests`, `errors` and `latency_h` on
`llm_calls_1m_total`, computed from the states (DEFAULT) as rows are inserted and materialized
for older parts. `latency_hist` is the histogram as (bucket indexes, counts) of its non-empty
buckets. A minute that sits in one row (parts merged) is read without any aggregation: see
`per_minute_total_sql`; the states stay for everything else."""


def _plain_total(cfg: ClickHouseConfig) -> list[str]:
    db = cfg.database
    oc = _on_cluster(cfg)
    table = "llm_calls_1m_total"
    out = [
        f"ALTER TABLE {db}.{table}{oc} ADD COLUMN IF NOT EXISTS {c} {t} DEFAULT {expr}"
        for c, (t, expr) in PLAIN_TOTAL.items()
    ]
    if cfg.cluster:
        out += [f"ALTER TABLE {db}.{table}_all{oc} ADD COLUMN IF NOT EXISTS {c} {t}" for c, (t, _) in PLAIN_TOTAL.items()]
    # older parts: computed once now instead of at every read (a mutation; running it again changes nothing)
    out += [f"ALTER TABLE {db}.{table}{oc} MATERIALIZE COLUMN {c} SETTINGS mutations_sync = 2" for c in PLAIN_TOTAL]
    return out


def hist_map_quantile_sql(level: float, hist: str) -> str:
    """Like `hist_quantile_sql`, for a (bucket indexes, counts) histogram such as `latency_hist`
    or `sumMap(latency_hist)`; NULL where it is empty."""
    keys, counts = f"{hist}.1", f"{hist}.2"
    rank = f"arrayWithConstant(length({counts}), {level} * arraySum({counts}))"
    index = f"arrayFirstIndex((c, r) -> c >= r, arrayCumSum({counts}), {rank})"
    return f"if(empty({counts}), NULL, pow({HIST_RATIO}, {keys}[{index}] + 0.5))"


def per_minute_total_sql(db: str, where: str, level: float = 0.95, table: str = "llm_calls_1m_total") -> str:
    """Requests, error rate and the `level` latency quantile per minute of all traffic, for the
    minutes matching `where` (a condition on `bucket`), ordered by minute. A minute held in one
    row (the usual case once parts have merged) is read as it is, without GROUP BY (no state to
    merge: ~4 ms for 43,200 rows, plus ~20 ms for the quantiles); minutes spread over several rows
    are merged with sum / sumMap. Both reads of the table are planned together; a part that lands
    or merges at that very moment could show one minute as two partial rows in that answer.
    On a cluster pass `table="llm_calls_1m_total_all"`: a minute held by several shards is merged."""
    t = f"{db}.{table}"
    many = f"SELECT bucket FROM {t} WHERE {where} GROUP BY bucket HAVING count() > 1"
    return f"""SELECT bucket, requests, error_rate, latency_q FROM (
    SELECT bucket, requests_n AS requests, errors_n / requests AS error_rate,
        {hist_map_quantile_sql(level, 'latency_hist')} AS latency_q
    FROM {t} WHERE ({where}) AND bucket NOT IN ({many})
    UNION ALL
    SELECT bucket, sum(requests_n) AS requests, sum(errors_n) / requests AS error_rate,
        {hist_map_quantile_sql(level, 'sumMap(latency_hist)')} AS latency_q
    FROM {t} WHERE ({where}) AND bucket IN ({many}) GROUP BY bucket
) ORDER BY bucket"""
