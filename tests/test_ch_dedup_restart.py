"""A batch written by the sink that created the tables, and written again by its successor,
is counted once in the raw table and in every roll-up.

This is the crash the kill test found (issue 16): the first sink on a fresh store runs the
migrations, writes a batch, dies before committing its offsets; the next sink rebuilds the
batch from Kafka and writes it under the same deduplication token. Each writer is its own
process, as in production (ClickHouse keeps the views' identities in process memory).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from llmpulse.config import Settings
from llmpulse.embedded.store import open_store

WRITER = r"""
import os, signal, sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from llmpulse.config.clickhouse import ClickHouseConfig
from llmpulse.schemas import CallEvent, encode_batch
from llmpulse.sinks.clickhouse.migrate import open_migrated
from llmpulse.sinks.clickhouse.rows import TABLES
from llmpulse.sinks.clickhouse.writer import BatchWriter

store, applied = open_migrated(ClickHouseConfig(), Path(sys.argv[1]))
t0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
events = [
    CallEvent(event_id=f"r{i:05d}", ts=t0 + timedelta(milliseconds=70 * i), model=f"m{i % 3}", app="a",
              status_code=500 if i % 10 == 0 else 200, latency_ms=float(i % 900), prompt_tokens=i % 50)
    for i in range(1000)
]
spec = TABLES["calls"]
items, invalid = spec.items(encode_batch(events))
assert invalid == 0
BatchWriter(store.client, "llmpulse").insert(spec, items, "calls|0:0-19|1796000000000")
print("applied", applied, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # the crash: no clean close, nothing else written
"""


def write_once(data_dir: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", WRITER, str(data_dir)], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return proc.stdout


def test_batch_rewritten_after_the_migrating_writer_died_counts_once(tmp_path: Path) -> None:
    first = write_once(tmp_path)
    assert "applied [1, 2, 3, 4, 5" in first  # this writer created the tables and views
    second = write_once(tmp_path)
    assert "applied []" in second

    settings = Settings(data_dir=tmp_path)
    store = open_store(settings.clickhouse, tmp_path)
    try:
        got = [
            int(store.client.query(sql).result_rows[0][0])
            for sql in (
                "SELECT count() FROM llmpulse.llm_calls",
                "SELECT countMerge(requests) FROM llmpulse.llm_calls_1m",
                "SELECT countMerge(requests) FROM llmpulse.llm_calls_1h",
                "SELECT countMerge(requests) FROM llmpulse.llm_calls_1m_total",
                "SELECT countMerge(requests) FROM llmpulse.llm_calls_1h_total",
                "SELECT sumMerge(errors) FROM llmpulse.llm_calls_1m",
            )
        ]
    finally:
        store.close()
    assert got == [1000, 1000, 1000, 1000, 1000, 100]


class _Consumer:
    """Owns partition 0 of a topic (t.calls); records the offsets committed."""

    def __init__(self, topic: str = "t.calls") -> None:
        self.topic = topic
        self.commits: list[dict[int, int]] = []

    def assignment(self) -> list[Any]:
        from confluent_kafka import TopicPartition

        return [TopicPartition(self.topic, 0)]

    def commit(self, offsets: list[Any], asynchronous: bool) -> None:
        self.commits.append({tp.partition: tp.offset for tp in offsets})


def test_a_rebuilt_batch_whose_token_outlived_its_rows_is_written_again(tmp_path: Path) -> None:
    """ClickHouse writes a block's token to its deduplication log before it commits the part:
    a writer killed between the two leaves the token without the rows (the kill test lost a
    1,000-row batch so). Here that state is made with a lightweight DELETE, which keeps the
    token; the raw table alone is checked (in the real crash the views were never fed, here
    they were)."""
    from datetime import UTC, datetime, timedelta

    from llmpulse.config.clickhouse import ClickHouseConfig
    from llmpulse.schemas import CallEvent, encode_batch
    from llmpulse.sinks.clickhouse.migrate import open_migrated
    from llmpulse.sinks.clickhouse.rows import TABLES
    from llmpulse.sinks.clickhouse.steps.commit import CommitOffsets
    from llmpulse.sinks.clickhouse.steps.model import Batch
    from llmpulse.sinks.clickhouse.steps.write import WriteInThread
    from llmpulse.sinks.clickhouse.writer import BatchWriter

    store, _ = open_migrated(ClickHouseConfig(), tmp_path)
    try:
        t0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
        events = [CallEvent(event_id=f"r{i:04d}", ts=t0 + timedelta(milliseconds=70 * i), model="m", latency_ms=1.0)
                  for i in range(300)]  # fmt: skip
        spec = TABLES["calls"]
        items, _ = spec.items(encode_batch(events))
        writer = BatchWriter(store.client, "llmpulse")
        token = "t.calls|0:0-5|1796000000000"
        writer.insert(spec, items, token)
        store.client.command("DELETE FROM llmpulse.llm_calls WHERE event_id < 'r0100'")

        def count() -> int:
            return int(store.client.query("SELECT count() FROM llmpulse.llm_calls FINAL").result_rows[0][0])

        writer.insert(spec, items, token)
        assert count() == 200  # the token alone keeps the lost rows out: this is the state a crash leaves

        consumer = _Consumer()
        write = WriteInThread(writer, CommitOffsets(consumer), 0.01, 0.02, lambda: None, lambda: None)
        write.submit(Batch("t.calls", spec, items, token, {0: (0, 5)}, commit={0: 6}, rebuilt=True,
                           skipped=frozenset()))  # fmt: skip
        write.join()
        write.close()
        assert count() == 300 and consumer.commits == [{0: 6}]
        rows = store.client.query("SELECT event_id, count() c FROM llmpulse.llm_calls GROUP BY event_id HAVING c > 1")
        assert rows.result_rows == []
    finally:
        store.close()


def test_a_rebuilt_batch_of_a_table_without_roll_ups_is_written_whole_and_read_once(tmp_path: Path) -> None:
    """The same crash state for `llm_aggregates`, whose items are rows, not event objects: the
    rebuilt batch is written again whole (the chaos bench's sink retried it forever with
    "'list' object has no attribute 'aggregate_id'", stalling every table behind it), and
    FINAL reads each aggregate once, also when the first write had landed whole."""
    from datetime import UTC, datetime, timedelta

    from llmpulse.config.clickhouse import ClickHouseConfig
    from llmpulse.schemas import WindowAggregate, encode_batch
    from llmpulse.schemas.aggregate import aggregate_id, dimensions_key
    from llmpulse.sinks.clickhouse.migrate import open_migrated
    from llmpulse.sinks.clickhouse.rows import TABLES
    from llmpulse.sinks.clickhouse.steps.commit import CommitOffsets
    from llmpulse.sinks.clickhouse.steps.model import Batch
    from llmpulse.sinks.clickhouse.steps.write import WriteInThread
    from llmpulse.sinks.clickhouse.writer import BatchWriter

    store, _ = open_migrated(ClickHouseConfig(), tmp_path)
    try:
        t0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
        aggs = []
        for i in range(40):
            start = t0 + timedelta(seconds=10 * i)
            dk = dimensions_key({})
            aggs.append(WindowAggregate(
                aggregate_id=aggregate_id("calls", 10, int(start.timestamp() * 1000), dk), kind="calls", window_s=10,
                window_start=start, window_end=start + timedelta(seconds=10), dimensions={}, dims_key=dk, requests=i + 1,
            ))  # fmt: skip
        spec = TABLES["aggregates"]
        items, _ = spec.items(encode_batch(aggs))
        writer = BatchWriter(store.client, "llmpulse")
        token = "t.aggregates|0:0-3|1796000000000"
        writer.insert(spec, items, token)
        first_ids = sorted(a.aggregate_id for a in aggs)[:15]
        store.client.command("DELETE FROM llmpulse.llm_aggregates WHERE aggregate_id IN {ids:Array(String)}",
                             parameters={"ids": first_ids})  # fmt: skip

        def figures() -> tuple[int, int]:
            r = store.client.query("SELECT count(), sum(requests) FROM llmpulse.llm_aggregates FINAL").result_rows[0]
            return int(r[0]), int(r[1])

        writer.insert(spec, items, token)
        assert figures()[0] == 25  # the token alone keeps the lost rows out: the state a crash leaves
        def rebuild() -> list[dict[int, int]]:
            consumer = _Consumer("t.aggregates")

            def failed() -> None:  # the sink's backpressure hook, called while an INSERT fails
                write.terminate()
                raise AssertionError("the INSERT of the rebuilt batch failed (see the log)")

            write = WriteInThread(writer, CommitOffsets(consumer), 0.01, 0.02, failed, lambda: None)
            write.submit(Batch("t.aggregates", spec, items, token, {0: (0, 3)}, commit={0: 4}, rebuilt=True))
            write.join()
            write.close()
            return consumer.commits

        for _ in range(2):  # rebuilt, then rebuilt again after its rows all landed
            assert rebuild() == [{0: 4}]
            assert figures() == (40, sum(range(1, 41)))
    finally:
        store.close()
