"""Migration 4: log-bucketed latency / ttft histograms in the roll-ups, read back as quantiles."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from llmpulse.analysis.panels import Filters, timeseries
from llmpulse.analysis.readonly import QueryResult
from llmpulse.config.clickhouse import ClickHouseConfig
from llmpulse.embedded.store import open_store
from llmpulse.sinks.clickhouse.calls import CallStruct
from llmpulse.sinks.clickhouse.migrate import applied_versions, migrate
from llmpulse.sinks.clickhouse.rows import TABLES
from llmpulse.sinks.clickhouse.schema import (
    HIST_BUCKETS,
    HIST_RATIO,
    HIST_REL_ERROR,
    hist_quantile_sql,
    migrations,
    migrations_table_ddl,
)
from llmpulse.sinks.clickhouse.writer import BatchWriter

T0 = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=4)  # inside every TTL
LAT = hist_quantile_sql(0.95, "sumForEachMerge(latency_h)")
TTFT = hist_quantile_sql(0.95, "sumForEachMerge(ttft_h)")


def nearest_rank(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def calls(n: int, seed: int, prefix: str) -> list[CallStruct]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        model, app = ("gpt-4o", "chat") if i % 3 else ("haiku", "search")
        # spread over 1 ms .. minutes, a few under 1 ms; a third of the calls not streamed (no ttft)
        lat = rng.lognormvariate(6.0 if model == "gpt-4o" else 4.0, 1.2) if i % 50 else rng.uniform(0, 0.9)
        ttft = None if i % 3 == 1 else rng.lognormvariate(5.0, 0.7)
        out.append(CallStruct(
            model=model, provider="openai" if model == "gpt-4o" else "anthropic", app=app,
            event_id=f"{prefix}{i:06d}", ts=T0 + timedelta(seconds=i * 180 / n),  # three minutes
            status_code=500 if i % 17 == 0 else 200, latency_ms=lat, ttft_ms=ttft,
        ))  # fmt: skip
    return out


def assert_close(got: float | None, want: float) -> None:
    assert got is not None
    if want < HIST_RATIO:  # bucket 0: everything under HIST_RATIO ms, reported as its middle
        assert got <= HIST_RATIO
        return
    assert abs(got - want) / want <= HIST_REL_ERROR + 1e-9, (got, want)


def check_rollups(client: Any, raw: list[CallStruct]) -> None:
    groups: dict[str, dict[tuple[Any, ...], list[CallStruct]]] = {}
    for c in raw:
        assert c.ts is not None
        minute = c.ts.replace(second=0, microsecond=0).replace(tzinfo=None)
        hour = minute.replace(minute=0)
        groups.setdefault("llm_calls_1m", {}).setdefault((minute, c.model, c.app), []).append(c)
        groups.setdefault("llm_calls_1h", {}).setdefault((hour, c.model, c.app), []).append(c)
        groups.setdefault("llm_calls_1m_total", {}).setdefault((minute,), []).append(c)
        groups.setdefault("llm_calls_1h_total", {}).setdefault((hour,), []).append(c)
    for table, want in groups.items():
        key = "bucket" if table.endswith("_total") else "bucket, model, app"
        rows = client.query(
            f"SELECT {key}, countMerge(requests), sumMerge(errors), arraySum(sumForEachMerge(latency_h)), "
            f"arraySum(sumForEachMerge(ttft_h)), length(sumForEachMerge(latency_h)), {LAT}, {TTFT} "
            f"FROM llmpulse.{table} GROUP BY {key} ORDER BY {key}"
        ).result_rows
        width = len(next(iter(want)))
        got = {tuple(r[:width]): r[width:] for r in rows}
        assert set(got) == set(want), table
        for k, cs in want.items():
            n, errors, lat_n, ttft_n, length, p95, ttft_p95 = got[k]
            ttfts = [c.ttft_ms for c in cs if c.ttft_ms is not None]
            # the roll-ups' totals are the raw totals, and every call lands in exactly one bucket
            assert (n, errors, lat_n, ttft_n) == (len(cs), sum(c.status_code >= 500 for c in cs), len(cs), len(ttfts))
            assert length <= HIST_BUCKETS
            assert_close(p95, nearest_rank([c.latency_ms for c in cs], 0.95))
            assert_close(ttft_p95, nearest_rank(ttfts, 0.95))  # type: ignore[arg-type]


def test_histogram_p95_within_stated_error_and_totals_match_raw(tmp_path: Path) -> None:
    cfg = ClickHouseConfig()
    store = open_store(cfg, tmp_path)
    try:
        client = store.client
        migrate(client, cfg)
        writer = BatchWriter(client, cfg.database)
        raw = calls(6000, seed=7, prefix="h")
        for b in range(3):  # three INSERTs: three parts of each roll-up, merged at read time
            writer.insert(TABLES["calls"], raw[b::3], f"hist|{b}")
        writer.insert(TABLES["calls"], raw[0::3], "hist|0")  # a re-delivered batch is deduplicated
        check_rollups(client, raw)
        # merged parts read the same
        for t in ("llm_calls_1m", "llm_calls_1h", "llm_calls_1m_total", "llm_calls_1h_total"):
            client.command(f"OPTIMIZE TABLE llmpulse.{t} FINAL")
        check_rollups(client, raw)
        # a value beyond the last bucket: reported as at least the last bucket's start
        top = HIST_RATIO ** (HIST_BUCKETS - 1)
        writer.insert(TABLES["calls"], [CallStruct(model="slow", event_id="slow1", ts=T0, latency_ms=3 * top)], "slow")
        (p,) = client.query(f"SELECT {LAT} FROM llmpulse.llm_calls_1h WHERE model = 'slow'").result_rows[0]
        assert p >= top
    finally:
        store.close()


def test_upgrade_from_migration_3_keeps_old_buckets_and_fills_new_ones(tmp_path: Path) -> None:
    cfg = ClickHouseConfig()
    store = open_store(cfg, tmp_path)
    try:
        client = store.client
        migrate_to_3(client, cfg)
        writer = BatchWriter(client, cfg.database)
        old = calls(300, seed=1, prefix="o")
        writer.insert(TABLES["calls"], old, "old")
        assert migrate(client, cfg) == [m.version for m in migrations(cfg) if m.version >= 4]  # 4 and later ones
        assert 4 in applied_versions(client, cfg)
        new = [CallStruct(model=c.model, app=c.app, provider=c.provider, event_id="n" + (c.event_id or ""),
                          ts=(c.ts or T0) + timedelta(hours=2), latency_ms=c.latency_ms, ttft_ms=c.ttft_ms)
               for c in old]  # fmt: skip
        writer.insert(TABLES["calls"], new, "new")
        rows = client.query(
            f"SELECT toStartOfHour(bucket) AS h, countMerge(requests), {LAT}, "
            "quantilesTDigestMerge(0.5, 0.95, 0.99)(latency_q)[2] "
            "FROM llmpulse.llm_calls_1m_total GROUP BY h ORDER BY h"
        ).result_rows
        assert [r[1] for r in rows] == [300, 300]
        # buckets rolled up before migration 4 have no histogram (NULL), the t-digest still answers
        assert rows[0][2] is None and rows[0][3] > 0
        assert_close(rows[1][2], nearest_rank([c.latency_ms for c in new], 0.95))
    finally:
        store.close()


def migrate_to_3(client: Any, cfg: ClickHouseConfig) -> None:
    """A store as it was before migration 4 (what `migrate` did then)."""
    migrate_to(client, cfg, 3)


def migrate_to(client: Any, cfg: ClickHouseConfig, last: int) -> None:
    """A store as an older release left it: the migrations up to `last`, recorded."""
    client.command(f"CREATE DATABASE IF NOT EXISTS {cfg.database}")
    client.command(migrations_table_ddl(cfg))
    for m in migrations(cfg):
        if m.version > last:
            break
        for stmt in m.statements:
            client.command(stmt)
        client.insert(f"{cfg.database}.schema_migrations", [[m.version, m.name]], column_names=["version", "name"])


def test_dashboard_timeseries_reads_p95_from_the_histograms(tmp_path: Path) -> None:
    cfg = ClickHouseConfig()
    store = open_store(cfg, tmp_path)
    try:
        client = store.client
        migrate(client, cfg)
        raw = calls(3000, seed=3, prefix="d")
        BatchWriter(client, cfg.database).insert(TABLES["calls"], raw, "dash")

        def run(sql: str) -> QueryResult:
            return QueryResult(columns=[], rows=[list(r) for r in client.query(sql).result_rows])

        f = Filters(start=T0 - timedelta(days=1), end=T0 + timedelta(days=1))
        ts = timeseries(run, cfg.database, f, "model", max_points=48, max_series=10, window_s=60)
        assert ts.source == "llm_calls_1h" and ts.step_s == 3600
        for s in ts.series:
            cs = [c for c in raw if c.model == s.name]
            assert s.requests == [len(cs)]
            assert_close(s.latency_p95_ms[0], nearest_rank([c.latency_ms for c in cs], 0.95))
            assert_close(s.ttft_p95_ms[0], nearest_rank([c.ttft_ms for c in cs if c.ttft_ms is not None], 0.95))
        assert {s.name for s in ts.series} == {"gpt-4o", "haiku"}
    finally:
        store.close()
