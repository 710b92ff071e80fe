"""Migration 5: chained roll-ups and the plain per-minute columns of llm_calls_1m_total.

The 30-day per-minute chart reads `per_minute_total_sql`: minutes in one row without any
aggregation, minutes spread over several rows merged. It must give the same figures as
merging the aggregate states, before and after parts merge, and on a store upgraded from
migration 4 (older rows' plain columns filled from their states).
"""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path
from typing import Any

from llmpulse.config.clickhouse import ClickHouseConfig
from llmpulse.embedded.store import open_store
from llmpulse.sinks.clickhouse.migrate import migrate
from llmpulse.sinks.clickhouse.rows import TABLES
from llmpulse.sinks.clickhouse.schema import (
    hist_quantile_sql,
    migrations,
    per_minute_total_sql,
)
from llmpulse.sinks.clickhouse.writer import BatchWriter
from tests.test_rollup_histogram import T0, calls, migrate_to

STATES = (
    "SELECT bucket, countMerge(requests) AS n, sumMerge(errors) / n, "
    f"{hist_quantile_sql(0.95, 'sumForEachMerge(latency_h)')} "
    "FROM llmpulse.llm_calls_1m_total WHERE {where} GROUP BY bucket ORDER BY bucket"
)
WHERE = "bucket >= now() - INTERVAL 30 DAY"


def same_figures(client: Any) -> int:
    """The plain read equals the states' merge, minute by minute; returns the minutes."""
    fast = client.query(per_minute_total_sql("llmpulse", WHERE)).result_rows
    slow = client.query(STATES.format(where=WHERE)).result_rows
    assert [r[0] for r in fast] == [r[0] for r in slow]
    for a, b in zip(fast, slow, strict=True):
        assert a[1] == b[1] and math.isclose(a[2], b[2]), (a, b)
        assert (a[3] is None and b[3] is None) or math.isclose(a[3], b[3]), (a, b)
    return len(fast)


def several_rows(client: Any) -> int:
    return int(client.query(
        "SELECT count() FROM (SELECT bucket FROM llmpulse.llm_calls_1m_total GROUP BY bucket HAVING count() > 1)"
    ).result_rows[0][0])  # fmt: skip


def rollup_requests(client: Any) -> list[int]:
    return [
        int(client.query(f"SELECT countMerge(requests) FROM llmpulse.{t}").result_rows[0][0])
        for t in ("llm_calls_1m", "llm_calls_1h", "llm_calls_1m_total", "llm_calls_1h_total")
    ]


def test_plain_per_minute_read_equals_the_states(tmp_path: Path) -> None:
    cfg = ClickHouseConfig()
    store = open_store(cfg, tmp_path)
    try:
        client = store.client
        migrate(client, cfg)
        writer = BatchWriter(client, cfg.database)
        raw = calls(3000, seed=5, prefix="p")
        for b in range(3):  # three parts: every minute in three rows
            writer.insert(TABLES["calls"], raw[b::3], f"pm|{b}")
        assert several_rows(client) == 3
        assert same_figures(client) == 3
        client.command("OPTIMIZE TABLE llmpulse.llm_calls_1m_total FINAL")
        assert several_rows(client) == 0  # now read without aggregation
        assert same_figures(client) == 3
        # one late row lands in a merged minute: that minute is merged again at read time
        writer.insert(TABLES["calls"], calls(1, seed=6, prefix="late"), "pm|late")
        assert several_rows(client) == 1
        assert same_figures(client) == 3
        n, = client.query(per_minute_total_sql("llmpulse", WHERE)).result_rows[0][1:2]
        assert n == 1001
        # every roll-up in the chain holds every call once
        assert rollup_requests(client) == [3001] * 4
    finally:
        store.close()


def test_upgrade_from_migration_4_fills_plain_columns_and_chains_views(tmp_path: Path) -> None:
    cfg = ClickHouseConfig()
    store = open_store(cfg, tmp_path)
    try:
        client = store.client
        migrate_to(client, cfg, 4)
        writer = BatchWriter(client, cfg.database)
        old = calls(600, seed=8, prefix="o")
        writer.insert(TABLES["calls"], old, "old")
        def views_on(table: str) -> list[str]:
            q = f"SELECT dependencies_table FROM system.tables WHERE database = 'llmpulse' AND name = '{table}'"
            return sorted(client.query(q).result_rows[0][0])

        assert len(views_on("llm_calls")) == 4  # every view reads the raw inserts

        assert migrate(client, cfg) == [m.version for m in migrations(cfg) if m.version >= 5]  # 5 and later ones
        assert migrate(client, cfg) == []
        assert views_on("llm_calls") == ["llm_calls_1m_mv"]
        assert views_on("llm_calls_1m") == ["llm_calls_1h_mv", "llm_calls_1m_total_mv"]
        assert views_on("llm_calls_1m_total") == ["llm_calls_1h_total_mv"]
        # rows written before migration 5 got their plain columns from their states
        n, e = client.query("SELECT sum(requests_n), sum(errors_n) FROM llmpulse.llm_calls_1m_total").result_rows[0]
        assert (n, e) == (600, sum(c.status_code >= 500 for c in old))
        new = [c.__class__(**{**{f: getattr(c, f) for f in c.__struct_fields__}, "event_id": "n" + str(c.event_id),
                              "ts": (c.ts or T0) + timedelta(hours=1)}) for c in old]  # fmt: skip
        writer.insert(TABLES["calls"], new, "new")
        writer.insert(TABLES["calls"], new, "new")  # a replayed batch: skipped by every table of the chain
        assert rollup_requests(client) == [1200] * 4
        assert same_figures(client) == 6
    finally:
        store.close()
