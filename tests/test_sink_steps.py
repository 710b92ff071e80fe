"""The sink's steps (decode -> batch by table -> record intent and INSERT in a thread -> commit
offsets), each against an in-memory store and consumer: what is written, under which token,
and what is committed after what. The same steps against Kafka and chDB: test_sink.py,
test_ch_rebalance.py, test_sink_kill.py."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY

from llmpulse.schemas import CallEvent, encode_batch
from llmpulse.sinks.clickhouse.rows import TABLES, TableSpec
from llmpulse.sinks.clickhouse.steps.batch import BatchByTable
from llmpulse.sinks.clickhouse.steps.commit import CommitOffsets
from llmpulse.sinks.clickhouse.steps.decode import Decode
from llmpulse.sinks.clickhouse.steps.rebuild import Intent, Rebuild, plan_rebuilds
from llmpulse.sinks.clickhouse.steps.write import WriteInThread

TOPIC = "t.calls"
SPEC = TABLES["calls"]
GPU = TABLES["gpu"]


@dataclass
class Store:
    """Records what reaches ClickHouse, in order; INSERTs fail while `fail` > 0."""

    log: list[tuple[str, str, int]] = field(default_factory=list)  # (what, token, rows)
    ids: set[str] = field(default_factory=set)
    written: list[list[str]] = field(default_factory=list)  # the ids of each INSERT, in order
    skipped: dict[str, frozenset[str] | None] = field(default_factory=dict)  # token -> ids recorded as left out
    lookups: int = 0
    fail: int = 0
    land_on_fail: set[str] = field(default_factory=set)  # ids another writer's INSERT lands while one fails
    tokens: set[str] = field(default_factory=set)  # ClickHouse's deduplication log: a block under one is skipped
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record_intent(self, spec: TableSpec, topic: str, token: str, ranges: list[tuple[int, int, int]], rows: int,
                      skipped: frozenset[str] | None = None) -> None:  # fmt: skip
        with self.lock:
            self.log.append(("intent", token, rows))
            self.skipped[token] = skipped

    def insert(self, spec: TableSpec, items: list[Any], token: str | None = None) -> None:
        with self.lock:
            if self.fail > 0:
                self.fail -= 1
                self.failed += 1
                self.ids |= self.land_on_fail
                raise ConnectionError("connection refused")
            self.log.append(("insert", str(token), len(items)))
            if token is not None and token in self.tokens:
                return
            if token is not None:
                self.tokens.add(token)
            self.written.append([str(e.event_id) for e in items])
            self.ids.update(str(e.event_id) for e in items)

    def present_ids(self, spec: TableSpec, items: list[Any]) -> set[str]:
        self.lookups += 1
        return {str(e.event_id) for e in items} & self.ids


@dataclass
class TP:
    topic: str
    partition: int
    offset: int = -1001


@dataclass
class Consumer:
    owned: set[tuple[str, int]] = field(default_factory=lambda: {(TOPIC, 0), (TOPIC, 1), (TOPIC, 2)})
    commits: list[dict[int, int]] = field(default_factory=list)

    def assignment(self) -> list[TP]:
        return [TP(t, p) for t, p in sorted(self.owned)]

    def commit(self, offsets: list[Any], asynchronous: bool) -> None:
        assert not asynchronous
        self.commits.append({tp.partition: tp.offset for tp in offsets})


class Msg:
    def __init__(self, part: int, off: int, events: list[CallEvent], topic: str = TOPIC) -> None:
        self._v = encode_batch(events)
        self._p, self._o, self._t = part, off, topic

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000)

    def value(self) -> bytes:
        return self._v

    def error(self) -> None:
        return None


def events(prefix: str, n: int = 10) -> list[CallEvent]:
    t0 = datetime(2026, 11, 30, 12, tzinfo=UTC)
    return [CallEvent(event_id=f"{prefix}{i}", ts=t0 + timedelta(seconds=i), model="m", latency_ms=1.0) for i in range(n)]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Pipeline:
    store: Store
    consumer: Consumer
    clock: Clock
    decode: Decode
    batch: BatchByTable
    write: WriteInThread
    commit: CommitOffsets
    stalls: list[int] = field(default_factory=list)
    releases: list[int] = field(default_factory=list)


def pipeline(batch_rows: int = 1000, batch_seconds: float = 1.0) -> Pipeline:
    store, consumer, clock = Store(), Consumer(), Clock()
    stalls: list[int] = []
    releases: list[int] = []
    commit = CommitOffsets(consumer)
    write = WriteInThread(store, commit, 0.01, 0.02, lambda: stalls.append(1), lambda: releases.append(1))  # type: ignore[arg-type]
    batch = BatchByTable({TOPIC: SPEC}, batch_rows, batch_seconds, write, clock)
    return Pipeline(store, consumer, clock, Decode({TOPIC: SPEC}, batch), batch, write, commit, stalls, releases)


def test_commit_follows_the_insert_which_follows_the_intent() -> None:
    pl = pipeline(batch_rows=20)
    pl.decode.submit(Msg(0, 5, events("a")))
    assert pl.store.log == [] and pl.consumer.commits == []  # 10 rows: below batch_rows, nothing written
    pl.decode.submit(Msg(0, 6, events("b")))  # 20 rows: handed to the INSERT thread at once
    pl.decode.join()
    token = f"{TOPIC}|0:5-6|1700000000000"
    assert pl.store.log == [("intent", token, 20), ("insert", token, 20)]
    assert pl.consumer.commits == [{0: 7}]


def test_a_buffer_is_written_when_its_oldest_row_is_batch_seconds_old() -> None:
    pl = pipeline(batch_seconds=1.0)
    pl.decode.submit(Msg(1, 0, events("a")))
    pl.clock.now = 0.9
    pl.decode.poll()
    assert pl.store.log == []
    pl.clock.now = 1.0
    pl.decode.poll()
    pl.write.wait_idle()
    assert [w for w, _, _ in pl.store.log] == ["intent", "insert"] and pl.consumer.commits == [{1: 1}]


def test_a_failing_insert_is_retried_under_its_token_and_committed_only_once_written() -> None:
    pl = pipeline(batch_rows=10)
    before = REGISTRY.get_sample_value("llmpulse_sink_insert_failures_total", {"table": "llm_calls"}) or 0.0
    pl.store.fail = 10**9

    def stall() -> None:  # the sink pauses fetching here; ClickHouse comes back meanwhile
        pl.stalls.append(1)
        pl.store.fail = 0

    pl.write.stall = stall
    pl.decode.submit(Msg(2, 0, events("a")))
    pl.decode.join()
    inserts = [e for e in pl.store.log if e[0] == "insert"]
    intents = [e for e in pl.store.log if e[0] == "intent"]
    assert len(inserts) == 1 and {t for _, t, _ in intents} == {inserts[0][1]}  # same token every attempt
    assert REGISTRY.get_sample_value("llmpulse_sink_insert_failures_total", {"table": "llm_calls"}) == before + pl.store.failed
    assert pl.store.failed >= 1 and pl.stalls and pl.releases == [1]  # fetching paused while failing, resumed after
    assert pl.consumer.commits == [{2: 1}]


def test_batches_are_written_and_committed_in_the_order_handed_over() -> None:
    pl = pipeline(batch_rows=10)
    for off in range(6):
        pl.decode.submit(Msg(off % 2, off // 2, events(f"e{off}-")))
    pl.decode.join()
    assert [t for w, t, _ in pl.store.log if w == "insert"] == [
        f"{TOPIC}|{off % 2}:{off // 2}-{off // 2}|1700000000000" for off in range(6)
    ]
    assert pl.consumer.commits == [{0: 1}, {1: 1}, {0: 2}, {1: 2}, {0: 3}, {1: 3}]


def test_a_recorded_batch_is_rebuilt_under_its_token_and_holds_back_its_partitions_commit() -> None:
    pl = pipeline(batch_rows=10)
    # recorded by a sink that died: partition 0 offsets 0-1 and partition 1 offset 0
    pl.batch.plan([Rebuild(TOPIC, SPEC, "old-token", {0: (0, 1), 1: (0, 0)})])
    pl.decode.submit(Msg(0, 0, events("a")))
    pl.decode.submit(Msg(0, 1, events("b")))
    pl.decode.submit(Msg(0, 2, events("c")))  # past the rebuilt range: a batch of its own, written first
    pl.write.wait_idle()
    assert pl.store.log == [("intent", f"{TOPIC}|0:2-2|1700000000000", 10), ("insert", f"{TOPIC}|0:2-2|1700000000000", 10)]
    assert pl.consumer.commits == []  # partition 0 is not committed past the batch still being rebuilt
    pl.decode.submit(Msg(1, 0, events("d")))  # completes the rebuilt batch
    pl.decode.join()
    assert pl.store.log[2:] == [("insert", "old-token", 30)]  # not recorded again, same token
    assert pl.consumer.commits == [{0: 3, 1: 1}]
    assert pl.commit.rebuilt_batches == 1


def test_part_of_a_batch_rebuilt_here_writes_only_the_events_the_table_lacks() -> None:
    pl = pipeline()
    pl.store.ids = {"a0", "a1", "a2"}  # the lost INSERT had landed for these (or their twins)
    pl.batch.plan([Rebuild(TOPIC, SPEC, "old-token", {0: (4, 4)}, only_missing=True)])
    pl.decode.submit(Msg(0, 4, events("a", 5)))
    pl.decode.join()
    assert len(pl.store.log) == 1 and pl.store.log[0][0] == "insert" and pl.store.log[0][2] == 2
    assert pl.store.log[0][1].startswith("old-token|part|0:4-4|")
    assert pl.consumer.commits == [{0: 5}]


def test_roll_ups_get_each_event_id_once_and_the_ids_left_out_are_recorded_before_the_insert() -> None:
    pl = pipeline(batch_rows=30)
    pl.store.ids = {"a1", "a2"}  # written by an earlier batch
    pl.decode.submit(Msg(0, 0, events("a", 5)))  # a0-a4: a1, a2 already in the table
    pl.decode.submit(Msg(0, 1, events("b", 5) + events("b", 3)))  # b0-b2 twice in one message
    pl.decode.submit(Msg(1, 0, events("a", 4) + events("c", 8)))  # a0-a3 again at a new offset, in the same batch
    pl.decode.join()
    token = f"{TOPIC}|0:0-1,1:0-0|1700000000000"
    assert pl.store.log == [("intent", token, 25), ("insert", token, 16)]
    assert pl.store.skipped[token] == {"a1", "a2"}  # the table's ids; copies within the batch follow from the rule
    assert pl.store.written == [["a0", "a3", "a4", *(f"b{i}" for i in range(5)), *(f"c{i}" for i in range(8))]]
    pl.decode.submit(Msg(0, 2, events("c", 10)))  # a later batch: c0-c7 again, c8, c9 new
    pl.decode.join()
    assert pl.store.written[1] == ["c8", "c9"]
    assert pl.store.skipped[f"{TOPIC}|0:2-2|1700000000000"] == {f"c{i}" for i in range(8)}
    assert pl.consumer.commits == [{0: 2, 1: 1}, {0: 3}]


def test_the_rows_are_chosen_once_a_retry_writes_the_same_rows() -> None:
    pl = pipeline(batch_rows=10)
    pl.store.fail = 1
    pl.store.land_on_fail = {"a3"}  # while the first INSERT fails, a copy of a3 lands from elsewhere
    pl.decode.submit(Msg(0, 0, events("a")))
    pl.decode.join()
    assert pl.store.failed == 1 and "a3" in pl.store.ids
    # the retry writes the rows recorded with the intent, a3 included, without asking again
    assert pl.store.lookups == 1 and pl.store.written == [[f"a{i}" for i in range(10)]]
    assert set(pl.store.skipped.values()) == {frozenset()}


def test_a_rebuilt_batch_leaves_out_the_recorded_ids_without_asking_the_table() -> None:
    pl = pipeline()
    pl.store.ids = {f"a{i}" for i in range(10)}  # its own INSERT may have landed: all its ids are there
    pl.batch.plan([Rebuild(TOPIC, SPEC, "old-token", {0: (3, 4)}, skipped=frozenset({"a1", "a2"}))])
    pl.decode.submit(Msg(0, 3, events("a", 5)))
    pl.decode.submit(Msg(0, 4, events("a", 10)))  # a0-a4 again within the batch
    pl.decode.join()
    # the one lookup is the check after its INSERT (every row there: nothing more written)
    assert pl.store.lookups == 1 and pl.store.log == [("insert", "old-token", 8)]
    assert pl.store.written == [["a0", "a3", "a4", *(f"a{i}" for i in range(5, 10))]]  # as first written


def test_a_rebuilt_batch_whose_token_was_recorded_without_its_rows_writes_them_again() -> None:
    # a sink killed between ClickHouse's deduplication log and the part's commit: the token is
    # known, the rows are not there; the rebuilt INSERT under that token is skipped
    pl = pipeline()
    pl.store.tokens = {"old-token"}
    pl.store.ids = {"a1"}  # left out when first written (recorded), so not the rebuild's to check
    pl.batch.plan([Rebuild(TOPIC, SPEC, "old-token", {0: (3, 3)}, skipped=frozenset({"a1"}))])
    pl.decode.submit(Msg(0, 3, events("a", 5)))
    pl.decode.join()
    assert [(what, token.split("|")[:2]) for what, token, _ in pl.store.log] == [
        ("insert", ["old-token"]), ("insert", ["old-token", "lost"])
    ]
    assert pl.store.written == [["a0", "a2", "a3", "a4"]]
    assert pl.consumer.commits == [{0: 4}]
    # rebuilt again (the sink died before committing): everything is there, nothing more is written
    pl.batch.plan([Rebuild(TOPIC, SPEC, "old-token", {0: (3, 3)}, skipped=frozenset({"a1"}))])
    pl.decode.submit(Msg(0, 3, events("a", 5)))
    pl.decode.join()
    assert pl.store.written == [["a0", "a2", "a3", "a4"]] and len(pl.store.log) == 3


def test_a_batch_recorded_without_deduplication_is_rebuilt_whole() -> None:
    pl = pipeline()
    pl.batch.plan([Rebuild(TOPIC, SPEC, "old-token", {0: (3, 3)})])  # recorded before migration 8
    pl.decode.submit(Msg(0, 3, events("a", 5) + events("a", 5)))
    pl.decode.join()
    assert pl.store.log == [("insert", "old-token", 10)] and pl.store.written == [[f"a{i}" for i in range(5)] * 2]


def test_a_batch_written_before_a_pending_rebuild_leaves_its_ids_to_it() -> None:
    pl = pipeline(batch_rows=10)
    pl.batch.plan([Rebuild(TOPIC, SPEC, "old-token", {0: (0, 0), 1: (0, 0)}, skipped=frozenset())])
    pl.decode.submit(Msg(0, 0, events("a", 5)))  # taken by the rebuild, which still waits for partition 1
    pl.decode.submit(Msg(0, 1, events("a", 5) + events("n", 5)))  # a copy of a0-a4 at a new offset: a batch of its own
    pl.write.wait_idle()
    new = f"{TOPIC}|0:1-1|1700000000000"
    assert pl.store.skipped[new] == {f"a{i}" for i in range(5)} and pl.store.written == [[f"n{i}" for i in range(5)]]
    pl.decode.submit(Msg(1, 0, events("b", 5)))  # completes the rebuild: it writes a0-a4
    pl.decode.join()
    assert pl.store.written[1] == [*(f"a{i}" for i in range(5)), *(f"b{i}" for i in range(5))]
    assert pl.consumer.commits == [{0: 2, 1: 1}]


def test_offsets_of_partitions_given_away_are_not_committed() -> None:
    pl = pipeline(batch_rows=20)
    pl.decode.submit(Msg(0, 0, events("a")))
    pl.decode.submit(Msg(1, 0, events("b")))
    pl.consumer.owned = {(TOPIC, 1)}
    pl.decode.join()
    assert pl.consumer.commits == [{1: 1}]


def test_terminate_gives_up_a_failing_batch_without_committing_it() -> None:
    pl = pipeline(batch_rows=10)
    pl.store.fail = 10**9
    pl.decode.submit(Msg(0, 0, events("a")))
    pl.write.terminate()
    pl.decode.join()
    assert [w for w, _, _ in pl.store.log] == ["intent"] and pl.consumer.commits == []  # recorded: rebuilt later
    pl.write.close()


@pytest.mark.parametrize(
    ("positions", "expect"),
    [
        ({(TOPIC, 0): 10, (TOPIC, 1): 5}, []),  # committed past it: written
        ({(TOPIC, 0): 3, (TOPIC, 1): 2}, [("tok", {0: (3, 9), 1: (2, 4)}, False)]),  # whole
        ({(TOPIC, 0): 5, (TOPIC, 1): 2}, [("tok", {0: (5, 9), 1: (2, 4)}, True)]),  # partly committed
        ({(TOPIC, 1): 2}, [("tok", {1: (2, 4)}, True)]),  # partition 0 elsewhere
    ],
)
def test_plan_rebuilds(positions: dict[tuple[str, int], int], expect: list[tuple[str, dict[int, tuple[int, int]], bool]]) -> None:
    intents = [Intent(TOPIC, "tok", [(0, 3, 9), (1, 2, 4)], frozenset({"x"}))]
    got = [(r.token, r.ranges, r.only_missing) for r in plan_rebuilds(intents, positions, {TOPIC: SPEC})]
    assert got == expect
    assert all(r.skipped == {"x"} for r in plan_rebuilds(intents, positions, {TOPIC: SPEC}))  # as recorded
    # a table without roll-ups rebuilds only whole batches; its re-delivered rows replace their twins
    gpu = [(r.token, r.ranges) for r in plan_rebuilds(intents, positions, {TOPIC: GPU})]
    assert gpu == [(t, r) for t, r, partial in expect if not partial]


class StallConsumer:
    """While the sink stalls: a rebalance during its poll assigned a partition that is not paused."""

    def __init__(self, pending: list[Msg]) -> None:
        self.pending = pending
        self.pauses = 0
        self.seeks: list[tuple[str, int, int]] = []

    def assignment(self) -> list[TP]:
        return [TP(TOPIC, 0), TP(TOPIC, 1)]

    def pause(self, partitions: list[TP]) -> None:
        self.pauses += 1

    def poll(self, timeout: float) -> Msg | None:
        return self.pending.pop(0) if self.pending else None

    def seek(self, tp: Any) -> None:
        self.seeks.append((tp.topic, tp.partition, tp.offset))


def test_a_message_returned_while_stalling_is_read_again_not_dropped(tmp_path: Any) -> None:
    from llmpulse.config import Settings
    from llmpulse.sinks.clickhouse.sink import ClickHouseSink

    sink = ClickHouseSink(Settings(data_dir=tmp_path), "127.0.0.1:9", client=None)
    sink.consumer.close()
    fake = StallConsumer([Msg(1, 7, events("x"))])
    sink.consumer = fake
    sink._stall()
    assert fake.seeks == [(TOPIC, 1, 7)]  # fetched again after the INSERT, from that offset
    sink._stall()
    assert fake.pauses == 2 and sink.paused  # the whole assignment, new partition included, is paused again
    assert sink.buffered == 0
