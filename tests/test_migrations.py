"""Schema migrations: in order, recorded, idempotent, safe when two migrate at once; cluster DDL."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import clickhouse_connect

from llmpulse.config.clickhouse import ClickHouseConfig
from llmpulse.embedded.store import open_store
from llmpulse.sinks.clickhouse.migrate import applied_versions, emit_ddl, migrate
from llmpulse.sinks.clickhouse.rows import TABLES
from llmpulse.sinks.clickhouse.schema import migrations, migrations_table_ddl
from llmpulse.sinks.clickhouse.steps.rebuild import Intent
from llmpulse.sinks.clickhouse.writer import BatchWriter

EXPECTED = {
    "llm_calls", "llm_aggregates", "gpu_samples", "host_samples", "feedback", "alerts", "deadletter", "actions",
    "llm_calls_1m", "llm_calls_1h", "llm_calls_1m_mv", "llm_calls_1h_mv", "sink_intents", "schema_migrations",
    "llm_calls_1m_total", "llm_calls_1h_total", "llm_calls_1m_total_mv", "llm_calls_1h_total_mv",
}  # fmt: skip


def schema_of(client: Any) -> dict[str, str]:
    rows = client.query("SELECT name, create_table_query FROM system.tables WHERE database = 'llmpulse'").result_rows
    return {str(n): str(q) for n, q in rows}


def test_migrations_twice_and_concurrently_leave_one_schema(tmp_path: Path) -> None:
    cfg = ClickHouseConfig()
    latest = [m.version for m in migrations(cfg)]
    store = open_store(cfg, tmp_path)
    try:
        # two threads, each with its own client on the same store, migrate at the same moment
        clients = [store.client, clickhouse_connect.get_client(dsn=f"chdb://{tmp_path / 'clickhouse'}")]
        results: list[list[int]] = []
        errors: list[BaseException] = []
        barrier = threading.Barrier(2)

        def run(c: Any) -> None:
            barrier.wait()
            try:
                results.append(migrate(c, cfg))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        # every version applied by at least one of them; the union is the full list
        assert sorted({v for r in results for v in r}) == latest
        first = schema_of(store.client)
        assert set(first) == EXPECTED
        assert migrate(store.client, cfg) == []  # a second run does nothing
        assert applied_versions(store.client, cfg) == set(latest)
        assert schema_of(store.client) == first
        n = store.client.query("SELECT count() FROM llmpulse.schema_migrations FINAL").result_rows[0][0]
        assert n == len(latest)
        # TTLs follow the retention settings
        assert "toIntervalDay(30)" in first["llm_calls"] and "toIntervalDay(35)" in first["llm_calls_1m"]
        assert "AggregatingMergeTree" in first["llm_calls_1h"]
        clients[1].close()
    finally:
        store.close()


def test_retention_is_configurable(tmp_path: Path) -> None:
    cfg = ClickHouseConfig.model_validate({"retention_days": {"llm_calls": 7, "llm_calls_1h": 90, "actions": 60}})
    store = open_store(cfg, tmp_path)
    try:
        migrate(store.client, cfg)
        schema = schema_of(store.client)
        assert "toIntervalDay(7)" in schema["llm_calls"]
        assert "toIntervalDay(90)" in schema["llm_calls_1h"]
        assert "toIntervalDay(60)" in schema["actions"]
    finally:
        store.close()


def test_migration_8_keeps_batches_recorded_before_it_rebuildable_as_written(tmp_path: Path) -> None:
    cfg = ClickHouseConfig()
    store = open_store(cfg, tmp_path)
    try:
        # a store at migration 7, with a batch recorded by a sink of that time
        store.client.command(f"CREATE DATABASE IF NOT EXISTS {cfg.database}")
        store.client.command(migrations_table_ddl(cfg))
        for m in migrations(cfg):
            if m.version <= 7:
                for stmt in m.statements:
                    store.client.command(stmt)
                store.client.insert("llmpulse.schema_migrations", [[m.version, m.name]], column_names=["version", "name"])
        store.client.insert("llmpulse.sink_intents", [["llm_calls", "old", "t.calls", [(0, 0, 9)], 500]],
                            column_names=["table", "token", "topic", "ranges", "rows"])  # fmt: skip
        assert migrate(store.client, cfg) == [8]
        writer = BatchWriter(store.client, cfg.database)
        writer.record_intent(TABLES["calls"], "t.calls", "new", [(0, 10, 19)], 500, frozenset({"e2", "e1"}))
        writer.record_intent(TABLES["calls"], "t.calls", "none-left-out", [(0, 20, 29)], 500, frozenset())
        got = {i.token: i for i in writer.intents(["t.calls"])}
        assert got["old"] == Intent("t.calls", "old", [(0, 0, 9)], None)  # rebuilt whole, as it was written
        assert got["new"] == Intent("t.calls", "new", [(0, 10, 19)], frozenset({"e1", "e2"}))
        assert got["none-left-out"].skipped == frozenset()  # deduplicated, nothing left out: not the old kind
        assert migrate(store.client, cfg) == []
    finally:
        store.close()


def test_cluster_ddl() -> None:
    ddl = emit_ddl(ClickHouseConfig(cluster="prod"))
    assert "CREATE TABLE IF NOT EXISTS llmpulse.llm_calls_1m ON CLUSTER prod" in ddl
    assert "ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/llmpulse/llm_calls_1m', '{replica}')" in ddl
    assert "CREATE MATERIALIZED VIEW IF NOT EXISTS llmpulse.llm_calls_1h_mv ON CLUSTER prod" in ddl
    assert "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/llmpulse/actions', '{replica}')" in ddl
    assert "Distributed(prod, llmpulse, llm_calls" in ddl
    assert "non_replicated_deduplication_window" not in ddl  # replicated tables deduplicate by default
    local = emit_ddl(ClickHouseConfig())
    assert "ON CLUSTER" not in local and "Replicated" not in local and "Distributed" not in local
