"""A roll-up that kept a batch's token but lost its part (a sink SIGKILLed between ClickHouse's
deduplication log and the part) gets the batch again when the batch is rebuilt, exactly once.

The CI run of test_sink_kill that found it: `llm_calls` held all 100,000 events, one minute of
`llm_calls_1m` lacked one 1,000-row batch, because the rebuilt INSERT's block was skipped by
its token. Here that state is made by deleting the batch's part from the chosen roll-ups (a
lightweight DELETE by `_part` keeps the token in the deduplication log, as the crash does);
the batch is then rebuilt through the sink's write step, as after a restart.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from llmpulse import metrics
from llmpulse.config.clickhouse import ClickHouseConfig
from llmpulse.embedded.store import Store
from llmpulse.schemas import CallEvent, encode_batch
from llmpulse.sinks.clickhouse.migrate import open_migrated
from llmpulse.sinks.clickhouse.rollup_audit import RollupAudit
from llmpulse.sinks.clickhouse.rows import TABLES
from llmpulse.sinks.clickhouse.schema import CHAIN
from llmpulse.sinks.clickhouse.steps.commit import CommitOffsets
from llmpulse.sinks.clickhouse.steps.model import Batch
from llmpulse.sinks.clickhouse.steps.write import WriteInThread
from llmpulse.sinks.clickhouse.writer import BatchWriter

ROLLUPS = list(CHAIN)
T0 = datetime(2026, 11, 30, 12, 0, 5, tzinfo=UTC)


class _Consumer:
    def __init__(self) -> None:
        self.commits: list[dict[int, int]] = []

    def assignment(self) -> list[Any]:
        from confluent_kafka import TopicPartition

        return [TopicPartition("t.calls", 0)]

    def commit(self, offsets: list[Any], asynchronous: bool) -> None:
        self.commits.append({tp.partition: tp.offset for tp in offsets})


def _events(prefix: str, n: int, start: datetime) -> list[Any]:
    events = [
        CallEvent(
            event_id=f"{prefix}{i:04d}",
            ts=start + timedelta(milliseconds=37 * i),
            model=f"m{i % 3}",
            provider="openai",
            app=f"a{i % 2}",
            status_code=500 if i % 7 == 0 else 200,
            latency_ms=float(10 + i % 400),
            prompt_tokens=i % 50,
            completion_tokens=i % 11,
            cost_usd=(i % 5) / 1000,
        )
        for i in range(n)
    ]
    items, invalid = TABLES["calls"].items(encode_batch(events))
    assert invalid == 0
    return items


class Lab:
    """A store whose roll-ups can lose blocks the way a SIGKILL does."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.store, _ = open_migrated(ClickHouseConfig(), directory)
        for t in ROLLUPS:  # each block stays its own part until lost: the newest part is the batch's
            self.store.client.command(f"SYSTEM STOP MERGES llmpulse.{t}")

    def lose_last_block(self, tables: list[str]) -> None:
        """The crash's state: each roll-up's newest part gone from disk, its token still in the
        roll-up's deduplication log (ClickHouse writes the log before it commits the part)."""
        paths = [
            self.store.client.query(
                f"SELECT path FROM system.parts WHERE database = 'llmpulse' AND table = '{t}' AND active "
                "ORDER BY max_block_number DESC LIMIT 1"
            ).result_rows[0][0]
            for t in tables
        ]
        self.store.close()
        for p in paths:
            shutil.rmtree(p)
        self.store, _ = open_migrated(ClickHouseConfig(), self.directory)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.store.close()


def figures(store: Store, table: str) -> dict[tuple[Any, ...], tuple[int, int, int, int]]:
    """requests, errors, total tokens and cost (nano-dollars) per bucket and key of a roll-up."""
    dims = CHAIN[table][2]
    cols = ", model, provider, app" if dims else ""
    return by_key(store.client.query(
        f"SELECT toUnixTimestamp(bucket) b{cols}, countMerge(requests), sumMerge(errors), sumMerge(tokens_total), "
        f"toInt64(sumMerge(cost) * 1000000000) FROM llmpulse.{table} GROUP BY b{cols}"
    ).result_rows)


def truth(store: Store, table: str) -> dict[tuple[Any, ...], tuple[int, int, int, int]]:
    fn, dims = CHAIN[table][1], CHAIN[table][2]
    cols = ", model, provider, app" if dims else ""
    return by_key(store.client.query(
        f"SELECT toUnixTimestamp({fn}(ts, 'UTC')) b{cols}, count(), sum(is_error), sum(total_tokens), "
        f"toInt64(sum(ifNull(cost_usd, toDecimal64(0, 9))) * 1000000000) FROM llmpulse.llm_calls FINAL GROUP BY b{cols}"
    ).result_rows)


def by_key(rows: list[Any]) -> dict[tuple[Any, ...], tuple[int, int, int, int]]:
    """Rows of (bucket, key..., requests, errors, tokens, cost) -> {(bucket, key...): the four figures}."""
    return {tuple(r[:-4]): (int(r[-4]), int(r[-3]), int(r[-2]), int(r[-1])) for r in rows}


def counter(metric: Any, table: str) -> float:
    return float(metric.labels(table)._value.get())


def rebuild(store: Store, items: list[Any], token: str) -> list[dict[int, int]]:
    consumer = _Consumer()
    writer = BatchWriter(store.client, "llmpulse")
    write = WriteInThread(writer, CommitOffsets(consumer), 0.01, 0.02, lambda: None, lambda: None,
                          RollupAudit(store.client, ClickHouseConfig()))  # fmt: skip
    write.submit(Batch("t.calls", TABLES["calls"], items, token, {0: (40, 59)}, commit={0: 60}, rebuilt=True,
                       skipped=frozenset()))  # fmt: skip
    write.join()
    write.close()
    return consumer.commits


@pytest.mark.parametrize(
    "lost",
    [
        ROLLUPS,  # the chain from its first roll-up: written again into llm_calls_1m, which feeds the rest
        ["llm_calls_1m_total", "llm_calls_1h_total"],  # from the middle: into llm_calls_1m_total
        ["llm_calls_1h"],  # a last one alone
        [],  # nothing lost: nothing written
    ],
)
def test_a_rebuilt_batch_restores_a_block_the_roll_ups_lost_once(lab: Lab, lost: list[str]) -> None:
    writer = BatchWriter(lab.store.client, "llmpulse")
    spec = TABLES["calls"]
    earlier = _events("e", 1500, T0)  # shares the batch's minutes, hour and keys
    writer.insert(spec, earlier, "t.calls|0:0-39|1796000000000")
    batch = _events("b", 1000, T0 + timedelta(seconds=20))
    token = "t.calls|0:40-59|1796000000001"
    writer.insert(spec, batch, token)
    if lost:
        lab.lose_last_block(lost)
    store = lab.store
    BatchWriter(store.client, "llmpulse").insert(spec, batch, token)  # the token alone keeps the block out
    for t in ROLLUPS:
        assert (figures(store, t) == truth(store, t)) == (t not in lost), t
    repairs = {t: counter(metrics.SINK_ROLLUP_REPAIRS, t) for t in ROLLUPS}
    parts = {t: len(store.client.query(f"SELECT name FROM system.parts WHERE database = 'llmpulse' AND table = '{t}' "
                                       "AND active").result_rows) for t in ROLLUPS}  # fmt: skip

    assert rebuild(store, batch, token) == [{0: 60}]

    for t in ROLLUPS:
        assert figures(store, t) == truth(store, t), t
    roots = [t for t in lost if CHAIN[t][0] not in lost]
    assert {t: counter(metrics.SINK_ROLLUP_REPAIRS, t) - repairs[t] for t in ROLLUPS} == {
        t: float(t in roots) for t in ROLLUPS
    }
    if not lost:  # nothing was written into a roll-up
        assert parts == {t: len(store.client.query(f"SELECT name FROM system.parts WHERE database = 'llmpulse' AND "
                                                   f"table = '{t}' AND active").result_rows) for t in ROLLUPS}  # fmt: skip
    # rebuilt again (a crash before its offsets were committed): found whole, nothing written twice
    assert rebuild(store, batch, token) == [{0: 60}]
    for t in ROLLUPS:
        assert figures(store, t) == truth(store, t), t


def test_a_block_lost_above_a_roll_up_that_holds_it_is_reported_not_counted_twice(lab: Lab) -> None:
    """llm_calls_1m lost the block but llm_calls_1h (fed from it) holds it: writing it into
    llm_calls_1m would feed llm_calls_1h a second time, so it is not written, and said."""
    writer = BatchWriter(lab.store.client, "llmpulse")
    spec = TABLES["calls"]
    writer.insert(spec, _events("e", 800, T0), "t.calls|0:0-39|1796000000000")
    batch = _events("b", 500, T0 + timedelta(seconds=20))
    token = "t.calls|0:40-59|1796000000001"
    writer.insert(spec, batch, token)
    lab.lose_last_block(["llm_calls_1m"])
    store = lab.store
    BatchWriter(store.client, "llmpulse").insert(spec, batch, token)
    before = counter(metrics.SINK_ROLLUP_MISMATCHES, "llm_calls_1m")

    assert RollupAudit(store.client, ClickHouseConfig()).check(batch, token) == {
        "llm_calls_1m": "lacks", "llm_calls_1m_total": "holds", "llm_calls_1h": "holds", "llm_calls_1h_total": "holds",
    }  # fmt: skip

    assert counter(metrics.SINK_ROLLUP_MISMATCHES, "llm_calls_1m") == before + 1
    short = {k: truth(store, "llm_calls_1m")[k][0] - v[0] for k, v in figures(store, "llm_calls_1m").items()}
    assert sum(short.values()) == 500  # still short by the batch, and nowhere counted twice
    for t in ROLLUPS[1:]:
        assert figures(store, t) == truth(store, t), t
