"""The embedded runtime: broker start/stop and clear errors; the store's single owner."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from llmpulse.config.clickhouse import ClickHouseConfig
from llmpulse.config.loader import load_settings
from llmpulse.embedded.broker import EmbeddedBroker
from llmpulse.embedded.store import FAULT_STORE_DOWN_ENV, StoreDownFault, open_store, store_owner
from llmpulse.errors import LLMPulseError, StoreError
from llmpulse.sinks.clickhouse.migrate import applied_versions, emit_ddl, migrate
from llmpulse.sinks.clickhouse.schema import migrations


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(LLMPulseError, match=f"port {port}.*in use"):
            EmbeddedBroker(port).start()


def test_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALF_TANSU_BIN", "/nonexistent/tansu")
    with pytest.raises(LLMPulseError, match="Tansu broker binary is missing"):
        EmbeddedBroker(0).start()


def test_broker_starts_and_stops(tmp_path: Path) -> None:
    b = EmbeddedBroker(0, log_dir=tmp_path).start()
    assert b.alive()
    b.stop()
    assert not b.alive()


def test_store_has_one_owner_and_migrations_are_idempotent(tmp_path: Path) -> None:
    cfg = ClickHouseConfig()
    store = open_store(cfg, tmp_path, {"role": "test", "query_url": "http://x"})
    try:
        assert store_owner(tmp_path) == {"pid": __import__("os").getpid(), "role": "test", "query_url": "http://x"}
        with pytest.raises(StoreError, match="in use by another process"):
            open_store(cfg, tmp_path)
        versions = [m.version for m in migrations(cfg)]
        assert migrate(store.client, cfg) == versions
        assert migrate(store.client, cfg) == []
        assert applied_versions(store.client, cfg) == set(versions)
        tables = {r[0] for r in store.client.query("SHOW TABLES FROM llmpulse").result_rows}
        assert {"llm_calls", "llm_aggregates", "gpu_samples", "alerts", "feedback", "deadletter"} <= tables
    finally:
        store.close()
    assert store_owner(tmp_path) is None


def test_cluster_ddl_uses_replicated_engines() -> None:
    ddl = emit_ddl(ClickHouseConfig(cluster="prod"))
    assert "ON CLUSTER prod" in ddl
    assert "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/llmpulse/llm_calls', '{replica}')" in ddl


def test_the_store_down_fault_fails_every_call_while_its_file_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clickhouse_connect.driver.exceptions import OperationalError

    cfg = ClickHouseConfig()
    flag = tmp_path / "store-down"
    plain = open_store(cfg, tmp_path)
    plain.close()
    assert not isinstance(plain.client, StoreDownFault)  # off unless the variable names a file
    monkeypatch.setenv(FAULT_STORE_DOWN_ENV, str(flag))
    load_settings(None, environ={FAULT_STORE_DOWN_ENV: str(flag)})  # not a config key: a process with it starts
    store = open_store(cfg, tmp_path)
    try:
        c = store.client
        assert isinstance(c, StoreDownFault)
        c.command("CREATE TABLE default.t (x UInt8) ENGINE = MergeTree ORDER BY x")
        flag.touch()
        for call in (
            lambda: c.insert("default.t", [[1]], column_names=["x"]),
            lambda: c.raw_insert("default.t", ["x"], b"1\n", fmt="CSV"),
            lambda: c.query("SELECT 1"),
            lambda: c.command("SELECT 1"),
        ):
            with pytest.raises(OperationalError, match="connection refused"):
                call()
        flag.unlink()  # back: the same calls go through
        c.insert("default.t", [[2]], column_names=["x"])
        c.raw_insert("default.t", ["x"], b"3\n", fmt="CSV")
        assert c.query("SELECT groupArray(x) FROM (SELECT x FROM default.t ORDER BY x)").result_rows == [([2, 3],)]
        assert c.command("SELECT 7") == 7
    finally:
        store.close()


def test_a_sink_starting_while_the_store_is_down_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Start-up waits while ClickHouse is unreachable and migrates once it answers; a store
    held by another owner is not unreachability: that still stops start-up at once."""
    from llmpulse.errors import StoreError
    from llmpulse.sinks.clickhouse.migrate import open_migrated_waiting

    cfg = ClickHouseConfig()
    flag = tmp_path / "store-down"
    flag.touch()
    monkeypatch.setenv(FAULT_STORE_DOWN_ENV, str(flag))
    slept: list[float] = []

    def sleep(s: float) -> None:  # the store comes back after the third wait
        slept.append(s)
        if len(slept) == 3:
            flag.unlink()

    with caplog.at_level("WARNING"):
        store, applied = open_migrated_waiting(cfg, tmp_path, {"role": "sink"}, 0.0, 0.5, 1.0, sleep=sleep)
    try:
        assert slept == [0.5, 1.0, 1.0]  # backoff, capped
        assert sum("ClickHouse is unreachable" in r.getMessage() for r in caplog.records) == 3
        assert applied  # migrated once reachable
        assert store.client.command(f"SELECT count() FROM {cfg.database}.sink_intents") == 0
        with pytest.raises(StoreError, match=r"(?i)owner|held|lock|in use"):
            open_migrated_waiting(cfg, tmp_path, {"role": "sink"}, 0.0, 0.5, 1.0, sleep=lambda s: pytest.fail("waited"))
    finally:
        store.close()


def test_an_assignment_waits_for_the_recorded_batches_while_the_store_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sink assigned partitions while its store is unreachable reads the recorded batches
    once it answers, and plans their rebuild. It used to go on without them: their events came
    back in new batches, and a roll-up that had missed the recorded INSERT lacked them for good
    (chaos seed 25: one event missing from llm_calls_1m)."""
    from confluent_kafka import TopicPartition

    from llmpulse.sinks.clickhouse.migrate import open_migrated
    from llmpulse.sinks.clickhouse.rows import TABLES
    from llmpulse.sinks.clickhouse.sink import ClickHouseSink

    flag = tmp_path / "store-down"
    monkeypatch.setenv(FAULT_STORE_DOWN_ENV, str(flag))
    settings = load_settings(
        None, environ={FAULT_STORE_DOWN_ENV: str(flag), "LLMPULSE_SINK__RETRY_INITIAL_S": "0.1"}
    )
    store, _ = open_migrated(settings.clickhouse, tmp_path)
    topic = settings.kafka.topic("calls")
    sink = ClickHouseSink(settings, "127.0.0.1:1", store.client)  # no broker: only the callback runs

    class Committed:  # what the group's coordinator answers: partition 0 committed up to 5
        def committed(self, partitions: list[Any], timeout: float) -> list[Any]:
            return [TopicPartition(topic, 0, 5)]

    try:
        # a batch of offsets 5-9 was recorded, and maybe written, by a sink that died before committing
        sink.writer.record_intent(TABLES["calls"], topic, "t-5-9", [(0, 5, 9)], 5, frozenset())
        flag.touch()
        back = threading.Timer(1.0, flag.unlink)
        back.start()
        sink._on_assign(Committed(), [TopicPartition(topic, 0)])
        back.join()
        assert sink.rebuilding  # the recorded batch is to be rebuilt under its own token
    finally:
        sink.consumer.close()
        store.close()
