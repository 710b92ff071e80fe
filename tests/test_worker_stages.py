"""The worker's two stages without Kafka or Faust, against the in-memory emitter
(llmpulse/streams/emitter.py), as their contracts state them (window_stage.py,
finalize_stage.py): what each emits, in which order, what it writes as state and when,
which offsets it says are covered, and that stage 2 publishes every window once whatever
stage 1 sends again."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from llmpulse.config import Settings
from llmpulse.schemas import CallEvent
from llmpulse.schemas.aggregate import WindowAggregate, dimensions_key
from llmpulse.schemas.codec import encode
from llmpulse.schemas.partials import CloseMark, WindowPartials, decode_partials
from llmpulse.streams import window_state as WS
from llmpulse.streams.bulk_publish import Record
from llmpulse.streams.changelog_map import ChangelogMap
from llmpulse.streams.commits import CommitLedger
from llmpulse.streams.emitter import MemoryEmitter
from llmpulse.streams.finalize_stage import FinalizeStage
from llmpulse.streams.window_stage import WindowStage, call_dimensions, sources_of

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
GLOBAL = dimensions_key({})  # the key of all traffic
S = Settings()
CALLS = S.kafka.topic("calls")
PARTIALS = S.kafka.topic("partials")
AGGREGATES = S.kafka.topic("aggregates")
STATE = "w-windows-changelog"


@dataclass
class Msg:
    topic: str
    partition: int
    offset: int
    value: bytes


class Reader:
    """What stage 1 asks of its reader: a ledger, the partitions' ends, seeks."""

    def __init__(self) -> None:
        self.ledger = CommitLedger()
        self.seeks: list[tuple[str, int, int]] = []

    def highwater(self, topic: str, partition: int) -> int | None:
        return None

    async def at_end(self, topic: str, partition: int) -> bool:
        return True

    def seek(self, topic: str, partition: int, offset: int) -> None:
        self.seeks.append((topic, partition, offset))


class HeldEmitter(MemoryEmitter):
    """Partials are delivered only when `release()` is called (a slow broker)."""

    def __init__(self, partitions: int) -> None:
        super().__init__(partitions)
        self.held: list[asyncio.Future[Any]] = []

    async def send(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None) -> Any:
        await super().send(topic, key, value, partition)
        if topic != PARTIALS:
            return _done()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.held.append(fut)
        return fut

    async def publish(self, topic: str, records: list[Record]) -> list[Any]:
        futures = await super().publish(topic, records)
        if topic != PARTIALS:
            return futures
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.held.append(fut)
        return [fut]

    def release(self) -> None:
        for f in self.held:
            if not f.done():
                f.set_result(None)


def _done() -> asyncio.Future[Any]:
    f: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    f.set_result(None)
    return f


def call(i: int, sec: float, model: str = "m1") -> CallEvent:
    return CallEvent(
        event_id=f"e{i}", ts=T0 + timedelta(seconds=sec), model=model, app=f"a{i % 2}",
        status_code=200, latency_ms=10 + i % 7, prompt_tokens=i % 11, completion_tokens=3,
    )  # fmt: skip


def messages(events: list[CallEvent], first_offset: int = 0, partition: int = 0) -> list[Msg]:
    return [Msg(CALLS, partition, first_offset + i, encode(e)) for i, e in enumerate(events)]


def stored(emitter: MemoryEmitter, partition: int) -> dict[str, Any]:
    """What restore.py would read back from the window changelog's partition."""
    out: dict[str, Any] = {}
    for key, value in emitter.records.get((STATE, partition), []):
        assert key is not None
        k = json.loads(key)
        if value is None:
            out.pop(k, None)
        else:
            out[k] = json.loads(value)
    return out


def stage1(emitter: MemoryEmitter, state: dict[str, Any] | None = None) -> WindowStage:
    async def read_state(topic: str, partition: int) -> dict[str, Any]:
        assert topic == STATE
        return {k: v for k, v in (state or {}).items() if k.startswith(f"{partition}|")}

    return WindowStage(S, emitter, Reader(), read_state, STATE, call_dimensions(S, None))


def partial_messages(emitter: MemoryEmitter) -> list[tuple[int, WindowPartials | CloseMark]]:
    return [
        (p, decode_partials(v))
        for (t, p), recs in sorted(emitter.records.items()) if t == PARTIALS
        for _, v in recs if v is not None
    ]  # fmt: skip


def requests(msgs: list[tuple[int, WindowPartials | CloseMark]], window_s: int, dims_key: str) -> int:
    return sum(
        s.state["r"] for _, m in msgs if isinstance(m, WindowPartials) and m.window_s == window_s
        for s in m.sets if s.dims_key == dims_key
    )  # fmt: skip


def test_stage1_emits_each_closed_window_once_then_its_close_mark_and_writes_meta_last() -> None:
    async def run() -> None:
        em = MemoryEmitter(S.kafka.partitions)
        st = stage1(em)
        await st.assign({(CALLS, 0)})
        events = [call(i, i * 0.5, model=f"m{i % 3}") for i in range(200)]  # 0 .. 100 s
        futures, offsets = await st.submit({(CALLS, 0): messages(events)})
        # the batch's state covers every offset it read: the reader commits 200 once delivered
        assert offsets == {(CALLS, 0): 200} and all(f.done() for f in futures)
        msgs = partial_messages(em)
        # windows that ended 5 s (grace) before the last event, 10 s ones through [80, 90)
        closed_10 = {m.start_ms for _, m in msgs if isinstance(m, WindowPartials) and m.window_s == 10}
        start = int(T0.timestamp() * 1000)
        assert closed_10 == {start + 10_000 * k for k in range(9)}
        assert requests(msgs, 10, GLOBAL) == 180 and requests(msgs, 60, GLOBAL) == 120
        # each partials partition: the window messages, then this partition's close mark
        for fp in range(S.kafka.partitions):
            here = [m for p, m in msgs if p == fp]
            assert isinstance(here[-1], CloseMark) and here[-1].src == "calls:0"
            assert all(isinstance(m, WindowPartials) for m in here[:-1])
        # the state: the meta record after the accumulators of the batch (per window, W)
        keys = [json.loads(k) for k, _ in em.records[(STATE, 0)] if k is not None]
        parsed = [WS.parse(k) for k in keys]
        assert all(p is not None and p.partition == 0 and p.kind == "calls" for p in parsed)
        assert parsed[-1] is not None and parsed[-1].shape == "M"
        shapes = {p.shape for p in parsed if p is not None}
        assert shapes >= {"W", "D", "M"} and "A" not in shapes

    asyncio.run(run())


def test_stage1_writes_no_state_while_its_partials_are_in_flight_and_covers_no_offset_meanwhile() -> None:
    async def run() -> None:
        em = HeldEmitter(S.kafka.partitions)
        st = stage1(em)
        await st.assign({(CALLS, 0)})
        await st.submit({(CALLS, 0): messages([call(i, i * 0.5) for i in range(100)])})  # closes windows
        written = len(em.records[(STATE, 0)])
        assert em.held and not any(f.done() for f in em.held)
        # the next batch is applied in memory: no state written, no offset covered
        futures, offsets = await st.submit({(CALLS, 0): messages([call(100 + i, 50 + i * 0.5) for i in range(20)], 100)})
        assert offsets == {} and len(em.records[(STATE, 0)]) == written
        em.release()
        # delivered: the timer writes the close mark (meta), the tombstones and the state
        futures, offsets = await st.poll()
        assert all(f.done() for f in futures)
        assert offsets == {(CALLS, 0): 120}
        assert len(em.records[(STATE, 0)]) > written

    asyncio.run(run())


def test_stage1_writes_and_closes_a_deferred_batch_once_its_partials_are_delivered_without_a_next_batch() -> None:
    async def run() -> None:
        em = HeldEmitter(S.kafka.partitions)
        st = stage1(em)
        await st.assign({(CALLS, 0)})
        await st.submit({(CALLS, 0): messages([call(i, i * 0.5) for i in range(100)])})  # closes [0, 40)
        written = len(em.records[(STATE, 0)])
        # the last batch of a backlog: its events end the windows up to 80 s, but the partials
        # of the first close are in flight, so it is applied in memory only
        _, offsets = await st.submit({(CALLS, 0): messages([call(100 + i, 50 + i * 0.5) for i in range(60)], 100)})
        assert offsets == {} and len(em.records[(STATE, 0)]) == written
        closed_before = {m.start_ms for _, m in partial_messages(em) if isinstance(m, WindowPartials) and m.window_s == 10}
        em.release()
        # no batch and no timer: the delivery alone writes the state and closes its windows
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(em.records[(STATE, 0)]) > written
        covered = [o for _, o in st.reader.ledger.entries if o]
        assert covered == [{(CALLS, 0): 160}]
        closed = {m.start_ms for _, m in partial_messages(em) if isinstance(m, WindowPartials) and m.window_s == 10}
        start = int(T0.timestamp() * 1000)
        assert closed - closed_before == {start + 10_000 * k for k in range(4, 7)}  # [40, 70): 80 - 5 s grace

    asyncio.run(run())


def test_stage1_restored_from_its_changelog_continues_where_the_state_ends() -> None:
    async def run() -> None:
        em = MemoryEmitter(S.kafka.partitions)
        st = stage1(em)
        await st.assign({(CALLS, 0)})
        first = [call(i, i * 0.5) for i in range(100)]
        await st.submit({(CALLS, 0): messages(first)})
        await st.join()
        # a new worker: reads the state back, starts after it, skips a replay of the batch
        em2 = MemoryEmitter(S.kafka.partitions)
        st2 = stage1(em2, stored(em, 0))
        await st2.assign({(CALLS, 0)})
        assert await st2.start_offset((CALLS, 0)) == 100
        rest = [call(100 + i, 50 + i * 0.5) for i in range(100)]
        await st2.submit({(CALLS, 0): messages(first + rest)})  # redelivered from offset 0
        both = partial_messages(em) + partial_messages(em2)
        # every window closed by either worker counts each call once (the finalizer keeps
        # the latest part of a source: take each window's last message)
        last: dict[tuple[int, int], WindowPartials] = {}
        for _, m in both:
            if isinstance(m, WindowPartials) and m.window_s == 10:
                last[(m.start_ms, m.chunk)] = m
        n = sum(s.state["r"] for m in last.values() for s in m.sets if s.dims_key == GLOBAL)
        closed = len({k[0] for k in last})
        assert n == closed * 20  # two calls a second, every closed 10 s window complete

    asyncio.run(run())


def test_stage1_restored_closes_what_its_state_was_written_before_then_replays() -> None:
    """A batch's state is written before its close, and the close's mark only with the next
    batch's state: a worker killed in between (here: after the next batch's partials went
    out, before its state) leaves a state whose windows that close ended are still open. The
    new worker closes them before replaying, so the replayed late event of [0, 10 s) is late
    again (one ~late partial), not counted on time beside the ~late partial already sent."""

    async def run() -> None:
        em = MemoryEmitter(S.kafka.partitions)
        st = stage1(em)
        await st.assign({(CALLS, 0)})
        first = [call(i, i * 0.5) for i in range(100)]  # 0 .. 49.5 s: closes [0, 40 s)
        await st.submit({(CALLS, 0): messages(first)})
        state = stored(em, 0)
        assert state[WS.meta_key(0, "calls")]["c"] is None  # written before the close
        second = [call(100, 3.0), call(101, 50.0)]  # a late event of [0, 10 s), then one on time
        await st.submit({(CALLS, 0): messages(second, 100)})
        em2 = MemoryEmitter(S.kafka.partitions)
        st2 = stage1(em2, state)  # the state of the first batch: the second batch's is lost
        await st2.assign({(CALLS, 0)})
        assert await st2.start_offset((CALLS, 0)) == 100
        await st2.submit({(CALLS, 0): messages(second, 100)})
        last: dict[tuple[int, str, int], WindowPartials] = {}
        for _, m in partial_messages(em) + partial_messages(em2):
            if isinstance(m, WindowPartials) and m.window_s == 10:
                last[(m.start_ms, m.source, m.chunk)] = m
        start = int(T0.timestamp() * 1000)
        counted = {src: sum(s.state["r"] for s in m.sets if s.dims_key == GLOBAL) for (t, src, _), m in last.items() if t == start}
        assert counted == {"calls:0": 20, "calls:0~late": 1}

    asyncio.run(run())


FINAL = "w-final-changelog"


def read_back(emitter: MemoryEmitter, topic: str, fp: int) -> dict[str, Any]:
    """A changelog partition as restore.py reads it: the latest value of every live key."""
    state: dict[str, Any] = {}
    for key, value in emitter.records.get((topic, fp), []):
        assert key is not None
        if value is None:
            state.pop(json.loads(key), None)
        else:
            state[json.loads(key)] = json.loads(value)
    return state


def stage2(emitter: MemoryEmitter, changelog: MemoryEmitter | None = None) -> FinalizeStage:
    """Stage 2 writing its state through `emitter`; restored from what `changelog` holds."""

    async def load_state(fp: int) -> dict[str, Any]:
        return {} if changelog is None else read_back(changelog, FINAL, fp)

    async def seek(topic: str, partition: int, offset: int) -> None:
        raise AssertionError("no gap in these tests")

    return FinalizeStage(
        S, emitter, ChangelogMap(FINAL), load_state, seek, sources_of(S.kafka.partitions), None
    )


def test_stage2_publishes_each_window_once_whatever_stage1_sends_again() -> None:
    async def run() -> None:
        # stage 1 on all three source partitions, so every window is complete
        em1 = MemoryEmitter(S.kafka.partitions)
        st = stage1(em1)
        await st.assign({(CALLS, p) for p in range(S.kafka.partitions)})
        events = [call(i, i * 0.25, model=f"m{i % 3}") for i in range(480)]  # 0 .. 120 s
        for p in range(S.kafka.partitions):
            part = [e for i, e in enumerate(events) if i % S.kafka.partitions == p]
            await st.submit({(CALLS, p): messages(part, partition=p)})
        em2 = MemoryEmitter(S.kafka.partitions)
        fin = stage2(em2)
        for fp in range(S.kafka.partitions):
            values = [v for v in em1.values(PARTIALS, fp) if v is not None]
            msgs = [Msg(PARTIALS, fp, i, v) for i, v in enumerate(values)]
            await fin.submit(fp, msgs)
            # the same batch again (a redelivery) is skipped by offset; the same partials
            # again at new offsets (stage 1 restarted and closed them again) change nothing
            await fin.submit(fp, msgs)
            await fin.submit(fp, [Msg(PARTIALS, fp, len(values) + i, v) for i, v in enumerate(values)])
        aggs = [WindowAggregate.model_validate_json(v) for v in em2.values(AGGREGATES) if v is not None]
        ids = Counter(a.aggregate_id for a in aggs)
        assert ids and max(ids.values()) == 1  # every window and dimension set published once
        glob = {a.window_start: a.requests for a in aggs if a.window_s == 10 and a.dims_key == GLOBAL}
        assert len(glob) == 11 and all(n == 40 for n in glob.values())  # [0, 110) s: 4 calls a second
        per_model = sum(a.requests for a in aggs if a.window_s == 60 and a.dimensions.get("model"))
        assert per_model == 240  # the minute [0, 60) s of all three models
        # the state says so: a restarted stage 2, its state read back from the changelog
        # records the first one wrote, publishes nothing again
        assert any(em2.records.get((FINAL, fp)) for fp in range(S.kafka.partitions))
        em3 = MemoryEmitter(S.kafka.partitions)
        fin2 = stage2(em3, changelog=em2)
        for fp in range(S.kafka.partitions):
            values = [v for v in em1.values(PARTIALS, fp) if v is not None]
            await fin2.submit(fp, [Msg(PARTIALS, fp, 2 * len(values) + i, v) for i, v in enumerate(values)])
        assert em3.values(AGGREGATES) == []

    asyncio.run(run())


class Ends(Reader):
    """A reader whose partitions' ends are set by the test (at its end: no message waits)."""

    def __init__(self) -> None:
        super().__init__()
        self.not_at_end: set[tuple[str, int]] = set()

    async def at_end(self, topic: str, partition: int) -> bool:
        return (topic, partition) not in self.not_at_end


class TwoPartitions:
    """Stage 1 on calls partitions 0 and 1, its partials handed to stage 2 as they come."""

    def __init__(self, idle_close_s: float) -> None:
        self.settings = Settings(kafka={"partitions": 2}, worker={"idle_close_s": idle_close_s})
        self.em1 = MemoryEmitter(2)
        self.em2 = MemoryEmitter(2)
        self.reader = Ends()

        async def no_state(topic: str, partition: int) -> dict[str, Any]:
            return {}

        async def seek(topic: str, partition: int, offset: int) -> None:
            raise AssertionError("no gap in these tests")

        self.st1 = WindowStage(self.settings, self.em1, self.reader, no_state, STATE, call_dimensions(self.settings, None))
        self.st2 = FinalizeStage(
            self.settings, self.em2, ChangelogMap(FINAL), lambda fp: no_state(FINAL, fp), seek, sources_of(2), None
        )
        self.fed = [0, 0]

    async def to_stage2(self) -> list[WindowAggregate]:
        """Stage 2 on the partials stage 1 sent since the last call; every aggregate published so far."""
        for fp in range(2):
            values = [v for v in self.em1.values(PARTIALS, fp) if v is not None]
            await self.st2.submit(fp, [Msg(PARTIALS, fp, i, v) for i, v in enumerate(values) if i >= self.fed[fp]])
            self.fed[fp] = len(values)
        return [WindowAggregate.model_validate_json(v) for v in self.em2.values(AGGREGATES) if v is not None]


def marks(emitter: MemoryEmitter) -> list[CloseMark]:
    return [m for _, m in partial_messages(emitter) if isinstance(m, CloseMark)]


def test_a_partition_without_events_at_start_up_holds_the_finalizer_until_its_events_come() -> None:
    """The worker starts before the traffic: both partitions are at their (empty) end when the
    timer first runs. Partition 0's first batch, spanning several windows, is then fetched
    before partition 1's of the same windows. Partition 1 is not declared empty at once (that
    published partition 0's windows short, as revision 1 judged by the rules, then again as
    revision 2): it sends no mark, so nothing is final until its events are in."""

    async def run() -> None:
        w = TwoPartitions(idle_close_s=30.0)
        await w.st1.assign({(CALLS, 0), (CALLS, 1)})
        await w.st1.poll()  # the timer: no event anywhere yet, both at their end
        events = [call(i, i * 0.25, model=f"m{i % 3}") for i in range(480)]  # 0 .. 120 s, 4 a second
        await w.st1.submit({(CALLS, 0): messages(events[0::2], partition=0)})
        await w.st1.poll()
        assert await w.to_stage2() == []  # its windows wait for partition 1
        assert {m.src for m in marks(w.em1)} == {"calls:0"}  # partition 1 claimed nothing
        await w.st1.submit({(CALLS, 1): messages(events[1::2], partition=1)})
        await w.st1.poll()
        aggs = await w.to_stage2()
        assert aggs and {a.revision for a in aggs} == {1}
        assert max(Counter(a.aggregate_id for a in aggs).values()) == 1  # each published once
        glob = {a.window_start: a.requests for a in aggs if a.window_s == 10 and a.dims_key == GLOBAL}
        assert len(glob) == 11 and set(glob.values()) == {40}  # [0, 110) s: both partitions' calls
        assert [a.requests for a in aggs if a.window_s == 60 and a.dims_key == GLOBAL] == [240]

    asyncio.run(run())


def test_a_partition_without_events_is_declared_empty_after_idle_close_s_at_its_end() -> None:
    """Declared empty once at its end without an event for `idle_close_s` since it was
    assigned: then it no longer holds the others back, and events it brings later are a
    backfill (the windows published again, revision 2). A partition not at its end (its
    messages wait in the broker) is not idle: its clock starts again."""

    async def run() -> None:
        w = TwoPartitions(idle_close_s=0.2)
        w.reader.not_at_end.add((CALLS, 1))
        await w.st1.assign({(CALLS, 0), (CALLS, 1)})
        await w.st1.poll()
        await asyncio.sleep(0.25)
        await w.st1.poll()
        assert {(m.src, m.mark) for m in marks(w.em1)} == {("calls:0", None)}  # 1 has messages waiting
        w.reader.not_at_end.clear()
        await w.st1.poll()
        assert {(m.src, m.mark) for m in marks(w.em1)} == {("calls:0", None)}  # its clock restarted
        await asyncio.sleep(0.25)
        await w.st1.poll()
        assert {(m.src, m.mark) for m in marks(w.em1)} == {("calls:0", None), ("calls:1", None)}
        events = [call(i, i * 0.25) for i in range(480)]
        await w.st1.submit({(CALLS, 0): messages(events[0::2], partition=0)})
        first = await w.to_stage2()
        glob = {a.window_start: a.requests for a in first if a.window_s == 10 and a.dims_key == GLOBAL}
        assert len(glob) == 11 and set(glob.values()) == {20}  # partition 1 declared empty: not waited for
        await w.st1.submit({(CALLS, 1): messages(events[1::2], partition=1)})
        later = [a for a in await w.to_stage2() if a.window_s == 10 and a.dims_key == GLOBAL and a.revision == 2]
        assert {a.window_start: a.requests for a in later} == {t: 40 for t in glob}  # the backfill

    asyncio.run(run())
