"""Stage 1's input: the source topics read in bulk by our own aiokafka consumer.

Faust's agent stream costs tens of microseconds of its own machinery per message
(a queue hop, an event object, an ack, commit bookkeeping): with one event per message,
as users' own producers send them, that capped a worker at a few thousand events/s.
This consumer fetches with `getmany` and hands whole batches to stage 1, so its cost
is per batch. It has its own consumer group (`<prefix>worker-sources`), joined with
the range assignor, which gives partition p of every source topic to one member: the
window state of partition p (all kinds) has one writer. The Faust app, in the same
process, keeps the partials, the finalizer, its table and changelog.

Contract (as arroyo's strategies state theirs):
- poll: `getmany` of the partitions not held back (waits up to `poll_ms` for records;
  a partition running ahead in event time on a backlog is held, alignment.py, its fetched
  records left buffered in the consumer) -> `handle(records)`, which runs
  stage 1 on the batch under its lock and returns the delivery futures of the state
  records queued (and dead letters sent) for it and, per partition, the offset (next to
  read) that queued state covers. Nothing waits for Kafka there, except restoring a
  partition's state the first time it is seen: a partition whose last close is still in
  flight keeps its new state in memory and queues it with a later batch (window_stage.py).
- commit: every `commit_interval_s`, the offsets of the batches whose state has been
  delivered (commits.py: in batch order, never past an undelivered one). Commits lag
  the state; a replay from a lagging commit is skipped by the state's applied offset.
- revoke (a rebalance): waits for the batch in progress (the lock), drops the revoked
  partitions' windows, waits for every state delivery, commits, and only then returns,
  so the next owner, which restores after every member has returned from its revoke,
  reads the whole state. `stop` does the same for every partition and leaves the group.

Fetching overlaps stage 1: aiokafka's fetcher prefetches in the background, but with one
fetch request in flight per broker, for the partitions whose buffered records are all
consumed. A fetch that finds nothing new (partitions caught up, such as the GPU, feedback
and host topics of a calls-only workload, or a calls partition whose models sent less) is
held by the broker for `fetch_max_wait_ms`, and while it is in flight a backlogged
partition, drained by stage 1 meanwhile, cannot be fetched again. With aiokafka's default
(500 ms), over a single-event backlog of 200,000 events in which calls partition 1 held
more than 0 and 2, 13 of the 31 source fetches were such 0.5 s waits on the caught-up
partitions (6.6 s of a 10.3 s run) and the event loop sat idle in `getmany` for 1.1-1.9 s
of 8-10 s (bench/run.py worker, single-event run). FETCH_MAX_WAIT_MS
bounds that stall; its cost is an idle worker's empty fetch every FETCH_MAX_WAIT_MS. It
changes when records are fetched, not which: offsets and commits are as below.

No silently skipped offsets: the consumer starts a partition from the group's
committed offset, which never runs ahead of the delivered state (without one: from
the offset after the state's last applied one, or the earliest without state), and
stage 1 admits a partition's messages only as a continuation of the state's applied
offset (contiguity.py OffsetGuard): a forward jump, whatever causes it (a seek undone
by a fetch in flight, a commit ahead of a state rewound on its changelog), cuts the
batch at the gap and seeks this consumer back to the first missing offset; messages
at or below the applied offset are skipped. Only a gap that stays after several seeks
(offsets with no message: transaction markers, retention) is accepted, with a warning.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from llmpulse.streams.commits import CommitLedger

log = logging.getLogger(__name__)

# how long the broker may hold a fetch that finds nothing new (aiokafka: 500 ms). Short,
# because one fetch of idle partitions in flight keeps the busy ones from being fetched
FETCH_MAX_WAIT_MS = 50

TopicPart = tuple[str, int]
# records by (topic, partition) -> (state deliveries, offsets consumed: next to read)
Handle = Callable[[dict[TopicPart, Sequence[Any]]], Awaitable[tuple[list[Any], dict[TopicPart, int]]]]
# partitions -> state deliveries to wait for
Revoke = Callable[[set[TopicPart]], Awaitable[list[Any]]]
Assign = Callable[[set[TopicPart]], Awaitable[None]]
# a partition the group never committed -> the offset its state continues from (None: no state)
StartOffset = Callable[[TopicPart], Awaitable[int | None]]
# the partitions not to read now (event-time alignment, alignment.py)
Held = Callable[[], set[TopicPart]]


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, reader: SourceReader) -> None:
        self.reader = reader

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.reader._revoked({(tp.topic, tp.partition) for tp in revoked})

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        tps = {(tp.topic, tp.partition) for tp in assigned}
        self.reader._assigned_now(tps)
        await self.reader.on_assign(tps)
        await self.reader._start_uncommitted(tps)


class SourceReader:
    def __init__(
        self,
        bootstrap: str,
        group_id: str,
        topics: Sequence[str],
        client: dict[str, Any],
        handle: Handle,
        on_revoke: Revoke,
        on_assign: Assign,
        start_offset: StartOffset,
        *,
        max_records: int,
        session_timeout_ms: int,
        poll_ms: int = 200,
        commit_interval_s: float = 1.0,
        held: Held | None = None,
    ) -> None:
        self.topics = list(topics)
        self.handle = handle
        self.on_revoke = on_revoke
        self.on_assign = on_assign
        self.start_offset = start_offset
        self.max_records = max_records
        self.poll_ms = poll_ms
        self.commit_interval_s = commit_interval_s
        self.held = held
        self.ledger = CommitLedger()
        self.owned: set[TopicPart] = set()
        self.rebalancing = True  # until the first assignment
        self._stopping = False
        self._started = False
        self._closed = False
        self._stopped = asyncio.Event()
        # made in run(): aiokafka binds its consumer to the running event loop
        self.consumer: Any = None
        self._config: dict[str, Any] = dict(
            bootstrap_servers=bootstrap.split(","),
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            partition_assignment_strategy=(RangePartitionAssignor,),
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(500, session_timeout_ms // 6),
            max_poll_records=max_records,
            max_partition_fetch_bytes=10_000_000,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            fetch_max_bytes=50_000_000,
            **client,
        )

    # -- what stage 1 asks of its input ----------------------------------------------------------
    @property
    def ready(self) -> bool:
        return not self.rebalancing and not self._stopping

    def assignment(self) -> set[TopicPart]:
        return set(self.owned)

    def highwater(self, topic: str, partition: int) -> int | None:
        try:
            return self.consumer.highwater(TopicPartition(topic, partition))  # type: ignore[no-any-return]
        except (AssertionError, Exception):
            return None

    async def at_end(self, topic: str, partition: int) -> bool:
        """Whether the partition is known to hold nothing past this consumer's position: a
        fetch has reported its end (before the first fetch the end is unknown: False)."""
        tp = TopicPartition(topic, partition)
        try:
            high = self.consumer.highwater(tp)
            return high is not None and await self.consumer.position(tp) >= high
        except (AssertionError, Exception):
            return False

    def seek(self, topic: str, partition: int, offset: int) -> None:
        try:
            self.consumer.seek(TopicPartition(topic, partition), offset)
        except (AssertionError, Exception) as exc:  # revoked meanwhile: the next owner starts from its state
            log.warning("could not seek %s[%d] to %d: %s", topic, partition, offset, exc)

    # -- the loop ----------------------------------------------------------------------------------
    async def run(self) -> None:
        if self._stopping:
            return
        self._started = True
        self.consumer = AIOKafkaConsumer(**self._config)
        await self.consumer.start()
        self.consumer.subscribe(self.topics, listener=_Listener(self))
        last_commit = time.monotonic()
        try:
            while not self._stopping:
                batch = await self.consumer.getmany(
                    *self._readable(), timeout_ms=self.poll_ms, max_records=self.max_records
                )
                if batch and not self._stopping:
                    records = {(tp.topic, tp.partition): msgs for tp, msgs in batch.items() if msgs}
                    # shielded: a batch started is finished (its state queued) even if the task is cancelled
                    futures, offsets = await asyncio.shield(self.handle(records))
                    self.ledger.add(futures, offsets)
                now = time.monotonic()
                if now - last_commit >= self.commit_interval_s:
                    last_commit = now
                    await self._commit(self.ledger.committable())
        finally:
            self._stopped.set()

    def _readable(self) -> list[TopicPartition]:
        """The partitions `getmany` may hand out now: all (an empty list) unless some are held
        (alignment.py). A held partition's fetched records stay buffered in the consumer, and
        it is not fetched again meanwhile: aiokafka fetches a partition once its buffer is drained."""
        held = self.held() if self.held is not None else set()
        if not held:
            return []
        return [TopicPartition(*tp) for tp in sorted(self.owned - held)]

    async def halt(self) -> None:
        """Stop polling once the batch in progress is done (its state queued)."""
        self._stopping = True
        if self._started:
            try:
                await asyncio.wait_for(self._stopped.wait(), self.poll_ms / 1000 + 30)
            except TimeoutError:
                log.warning("the source reader did not finish its batch in time")

    async def stop(self) -> None:
        """Halt, deliver all state, commit what it covers, leave the group."""
        await self.halt()
        if self._closed:
            return
        self._closed = True
        try:
            if self._started:
                await self._settle(await self.on_revoke(set(self.owned)))
                log.info("source reader: state delivered and its offsets committed; leaving the group")
        finally:
            self.owned = set()
            if self.consumer is not None:
                await self.consumer.stop()

    # -- rebalances ---------------------------------------------------------------------------------
    async def _revoked(self, revoked: set[TopicPart]) -> None:
        self.rebalancing = True
        # still ours until this returns: commit what the delivered state covers, then let go
        await self._settle(await self.on_revoke(revoked))
        self.ledger.forget(revoked)
        self.owned -= revoked

    def _assigned_now(self, assigned: set[TopicPart]) -> None:
        self.owned = set(assigned)
        self.rebalancing = False

    async def _start_uncommitted(self, tps: set[TopicPart]) -> None:
        """A partition this group never committed (a new group, such as the first start after
        stage 1 left Faust's group) starts where its state continues, not at the earliest
        retained offset: the replay of the whole topic would be skipped anyway, slowly."""
        for topic, partition in sorted(tps):
            tp = TopicPartition(topic, partition)
            try:
                if await self.consumer.committed(tp) is not None:
                    continue
            except Exception as exc:
                log.info("committed offset of %s[%d] unknown (%s); starting from the group's position", topic, partition, exc)
                continue
            offset = await self.start_offset((topic, partition))
            if offset is not None:
                log.info("%s[%d]: no committed offset; starting at %d, where its state continues", topic, partition, offset)
                self.seek(topic, partition, offset)

    async def _settle(self, futures: list[Any]) -> None:
        """Wait for every state delivery, then commit everything it covers."""
        pending = [f for entry in self.ledger.entries for f in entry[0]] + list(futures)
        if pending:
            await asyncio.gather(*pending)
        await self._commit(self.ledger.committable())

    async def _commit(self, offsets: dict[Hashable, int]) -> None:
        if not offsets:
            return
        tps = {TopicPartition(*key): offset for key, offset in offsets.items()}  # type: ignore[misc]
        try:
            await self.consumer.commit(tps)
        except Exception as exc:  # a rebalance under way: the state still covers them; the next commit will
            log.info("commit of source offsets deferred: %s", exc)
