"""A recorded batch split by a rebalance: nobody can rebuild it whole, nothing counts twice.

Sink A buffers calls from three partitions, records the batch and (maybe) INSERTs it,
then dies before committing. Its partitions go to two sinks, B (partitions 0 and 2)
and C (partition 1), so neither holds the whole batch. Each rebuilds its part and writes
only the events llm_calls does not hold: raw rows and all four roll-ups end with every
event exactly once, whether A's INSERT landed or not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Producer, TopicPartition

from llmpulse.config import Settings
from llmpulse.schemas import encode_batch
from llmpulse.sinks.clickhouse.rows import TABLES
from llmpulse.sinks.clickhouse.sink import ClickHouseSink
from llmpulse.sinks.clickhouse.writer import BatchWriter
from tests.test_sink import calls, store_of, wait

ROLLUPS = ("llm_calls_1m", "llm_calls_1h", "llm_calls_1m_total", "llm_calls_1h_total")


def produce_to_partitions(settings: Settings, n: int, per_message: int = 50) -> None:
    events = calls(n, "r")
    p = Producer({"bootstrap.servers": settings.kafka.bootstrap_servers(), "log_level": 3})
    for i, b in enumerate(range(0, n, per_message)):
        p.produce(settings.kafka.topic("calls"), value=encode_batch(events[b : b + per_message]), partition=i % 3)
    assert p.flush(30) == 0


def totals(client: Any) -> dict[str, tuple[int, str]]:
    out = {"llm_calls": tuple(client.query("SELECT count(), toString(sum(cost_usd)) FROM llmpulse.llm_calls").result_rows[0])}
    for t in ROLLUPS:
        out[t] = tuple(client.query(f"SELECT countMerge(requests), toString(sumMerge(cost)) FROM llmpulse.{t}").result_rows[0])
    return out  # type: ignore[return-value]


def rebuild(sink: ClickHouseSink, topic: str, partitions: list[int], end: dict[int, int]) -> None:
    """Own these partitions (as after a rebalance), consume them to their end, write and commit."""
    tps = [TopicPartition(topic, p) for p in partitions]
    sink._on_assign(sink.consumer, tps)
    sink.consumer.assign(tps)

    def caught_up() -> bool:
        sink.poll_once(0.2)
        return not sink.rebuilding and all(tp.offset >= end[tp.partition] for tp in sink.consumer.position(tps))

    assert wait(caught_up, 60)
    sink.join()
    sink.consumer.close()


@pytest.mark.parametrize("landed", [True, False], ids=["insert-landed", "insert-lost"])
def test_batch_split_across_two_sinks_counts_every_event_once(
    make_settings: Callable[..., Settings], landed: bool
) -> None:
    settings = make_settings(**{"sink.batch_seconds": 3600.0, "sink.batch_rows": 1_000_000})
    bootstrap = settings.kafka.bootstrap_servers()
    topic = settings.kafka.topic("calls")
    n = 3000
    produce_to_partitions(settings, n)
    with store_of(settings) as store:
        a = ClickHouseSink(settings, bootstrap, store.client)
        a.start()
        buf = a.buffers[topic]
        assert wait(lambda: a.poll_once(0.2) >= 0 and len(buf.items) == n)
        assert sorted(buf.ranges) == [0, 1, 2]
        end = {p: r[1] + 1 for p, r in buf.ranges.items()}
        # the write step up to the crash: recorded, INSERTed (or not), never committed
        spec = TABLES["calls"]
        ranges = [(p, r[0], r[1]) for p, r in sorted(buf.ranges.items())]
        a.writer.record_intent(spec, topic, buf.token(), ranges, len(buf.items))
        if landed:
            a.writer.insert(spec, buf.items, buf.token())
        buf.clear()
        a.consumer.close()
        before = totals(store.client)

        b = ClickHouseSink(settings, bootstrap, store.client)
        c = ClickHouseSink(settings, bootstrap, store.client)
        rebuild(b, topic, [0, 2], end)
        rebuild(c, topic, [1], end)
        after = totals(store.client)
        assert {t: v[0] for t, v in after.items()} == dict.fromkeys(after, n), (before, after)
        assert len({v[1] for v in after.values()}) == 1  # the same exact cost everywhere
        if landed:
            assert after == before  # nothing written again
        assert b.replayed_batches == 1 and c.replayed_batches == 1

        # a sink that later owns all three partitions finds the batch committed: nothing more
        d = ClickHouseSink(settings, bootstrap, store.client)
        d._on_assign(d.consumer, [TopicPartition(topic, p) for p in range(3)])
        assert not d.rebuilding
        d.consumer.close()


def test_rebuilding_a_batch_never_commits_rows_still_buffered(make_settings: Callable[..., Settings]) -> None:
    """A recorded batch of partition 0 is rebuilt while partition 1's rows sit in the buffer:
    the commit after the rebuilt INSERT covers partition 0 only, so a crash then loses nothing."""
    settings = make_settings(**{"sink.batch_seconds": 3600.0, "sink.batch_rows": 1_000_000})
    bootstrap = settings.kafka.bootstrap_servers()
    topic = settings.kafka.topic("calls")
    events = calls(2000, "s")
    p = Producer({"bootstrap.servers": bootstrap, "log_level": 3})
    for i in range(40):  # partition 1 first, then partition 0
        p.produce(topic, value=encode_batch(events[i * 50 : (i + 1) * 50]), partition=1 if i < 20 else 0)
    assert p.flush(30) == 0
    with store_of(settings) as store:
        spec = TABLES["calls"]
        BatchWriter(store.client, settings.clickhouse.database).record_intent(spec, topic, "earlier", [(0, 0, 19)], 1000)
        a = ClickHouseSink(settings, bootstrap, store.client)
        a.start()
        buf = a.buffers[topic]
        assert wait(lambda: a.poll_once(0.2) >= 0 and a.replayed_batches == 1 and len(buf.items) == 1000)
        committed = {tp.partition: tp.offset for tp in a.consumer.committed(
            [TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=30)}  # fmt: skip
        assert committed[0] == 20 and committed[1] < 0  # partition 1: nothing written, nothing committed
        buf.clear()
        a.consumer.close()

        b = ClickHouseSink(settings.model_copy(update={"sink": settings.sink.model_copy(update={"batch_seconds": 0.2})}),
                           bootstrap, store.client)  # fmt: skip
        b.start()
        assert wait(lambda: b.poll_once(0.2) >= 0 and totals(store.client)["llm_calls"][0] >= 2000)
        b.join()
        b.consumer.close()
        assert {t: v[0] for t, v in totals(store.client).items()} == dict.fromkeys(("llm_calls", *ROLLUPS), 2000)
