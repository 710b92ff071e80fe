"""Event-time alignment of source partitions (llmpulse/streams/alignment.py): which
partitions stage 1's reader holds back, from stage 1's event time and the partitions'
backlogs, and what the reader then asks its consumer for."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from aiokafka import TopicPartition

from llmpulse.config import Settings
from llmpulse.schemas import CallEvent
from llmpulse.schemas.codec import encode
from llmpulse.streams.alignment import PartitionTime, held_partitions
from llmpulse.streams.commits import CommitLedger
from llmpulse.streams.emitter import MemoryEmitter
from llmpulse.streams.source_reader import SourceReader
from llmpulse.streams.window_stage import WindowStage, call_dimensions
from tests.test_worker_stages import CALLS, STATE, T0, Msg

GPU = Settings().kafka.topic("gpu")
MIN = 60_000


def test_a_partition_more_than_the_skew_ahead_of_the_slowest_with_a_backlog_is_held() -> None:
    times = {
        (CALLS, 0): PartitionTime("calls", 0, True),  # the slowest with a backlog
        (CALLS, 1): PartitionTime("calls", MIN, True),  # exactly the skew ahead: read
        (CALLS, 2): PartitionTime("calls", MIN + 1, True),  # past it: held
    }
    assert held_partitions(times, MIN) == {(CALLS, 2)}
    # the slowest is never held: some partition always advances
    assert held_partitions(times, 0) == {(CALLS, 1), (CALLS, 2)}


def test_partitions_at_their_end_or_without_events_neither_hold_nor_are_held() -> None:
    times = {
        (CALLS, 0): PartitionTime("calls", 0, False),  # far behind but at its end: live, holds none
        (CALLS, 1): PartitionTime("calls", None, True),  # nothing applied yet: its time is unknown
        (CALLS, 2): PartitionTime("calls", 10 * MIN, True),
    }
    assert held_partitions(times, MIN) == set()
    # at its end, a partition ahead is not held either: what reaches it now is live traffic
    times[(CALLS, 1)] = PartitionTime("calls", 0, True)
    times[(CALLS, 2)] = PartitionTime("calls", 10 * MIN, False)
    assert held_partitions(times, MIN) == set()


def test_kinds_are_aligned_separately() -> None:
    # a GPU partition hours ahead of the calls is not held by them (a finalizer waits per kind)
    times = {
        (CALLS, 0): PartitionTime("calls", 0, True),
        (CALLS, 1): PartitionTime("calls", 2 * MIN, True),
        (GPU, 0): PartitionTime("gpu", 600 * MIN, True),
        (GPU, 1): PartitionTime("gpu", 601 * MIN, True),
    }
    assert held_partitions(times, MIN) == {(CALLS, 1)}


class EndsReader:
    """Stage 1's reader with the partitions' ends (next offsets) it was told."""

    def __init__(self, ends: dict[tuple[str, int], int]) -> None:
        self.ledger = CommitLedger()
        self.ends = ends

    def highwater(self, topic: str, partition: int) -> int | None:
        return self.ends.get((topic, partition))

    async def at_end(self, topic: str, partition: int) -> bool:
        return False

    def seek(self, topic: str, partition: int, offset: int) -> None:
        pass


def _calls(partition: int, start_s: float, n: int) -> list[Msg]:
    out = []
    for i in range(n):
        e = CallEvent(event_id=f"p{partition}-{i}", ts=T0 + timedelta(seconds=start_s + i), model="m",
                      status_code=200, latency_ms=10)  # fmt: skip
        out.append(Msg(CALLS, partition, i, encode(e)))
    return out


def test_stage1_holds_the_partition_running_ahead_until_the_slowest_catches_up_or_reaches_its_end() -> None:
    async def run() -> None:
        settings = Settings()
        assert settings.worker.max_source_skew_s == 60.0  # the shipped default
        ends = {(CALLS, 0): 1000, (CALLS, 1): 1000}  # both have a backlog past the 10 events read
        reader = EndsReader(ends)

        async def no_state(topic: str, partition: int) -> dict[str, Any]:
            return {}

        st = WindowStage(settings, MemoryEmitter(3), reader, no_state, STATE, call_dimensions(settings, None))
        await st.assign({(CALLS, 0), (CALLS, 1)})
        await st.submit({(CALLS, 0): _calls(0, 0, 10), (CALLS, 1): _calls(1, 3600, 10)})
        assert st.held() == {(CALLS, 1)}  # an hour ahead of partition 0
        await st.submit({(CALLS, 0): [Msg(CALLS, 0, 10 + m.offset, m.value) for m in _calls(0, 3550, 1)]})
        assert st.held() == set()  # partition 0 within the skew of it again
        ends[(CALLS, 0)] = 11  # ... or, behind but at its end: it holds nothing back
        await st.submit({(CALLS, 1): [Msg(CALLS, 1, 10 + m.offset, m.value) for m in _calls(1, 7200, 1)]})
        assert st.held() == set()
        ends[(CALLS, 0)] = 1000
        assert st.held() == {(CALLS, 1)}
        off = Settings.model_validate({"worker": {"max_source_skew_s": 0}})
        st.settings = off
        assert st.held() == set()  # 0: alignment off

    asyncio.run(run())


def test_the_reader_asks_its_consumer_for_the_partitions_not_held() -> None:
    held: set[tuple[str, int]] = set()

    async def nothing(*_: Any) -> Any:
        return None

    reader = SourceReader("127.0.0.1:9", "g", [CALLS], {}, nothing, nothing, nothing, nothing,  # type: ignore[arg-type]
                          max_records=10, session_timeout_ms=6000, held=lambda: held)  # fmt: skip
    reader.owned = {(CALLS, 0), (CALLS, 1), (CALLS, 2)}
    assert reader._readable() == []  # none held: every partition (getmany's default)
    held.add((CALLS, 1))
    assert reader._readable() == [TopicPartition(CALLS, 0), TopicPartition(CALLS, 2)]
