"""Stage 1: source events -> event-time windows per source partition -> one partials
message per closed window, then the partition's close mark.

Input: whole batches of source records from source_reader.py (calls, GPU samples,
feedback, host samples; several events a message or one). Output, through an `Emitter`
(emitter.py): to `partials`, per closed window one message with all its dimension sets
(schemas/partials.py), keyed so that every set of a window meets in one finalizer,
then the partition's close mark to every partials partition; to the dead-letter topic,
invalid and too-late events with their reason; to the window changelog, the state
(window_state.py). Nothing here imports Kafka or Faust.

Contract (as arroyo's strategies state theirs):
- `submit(records)`: apply a poll's records under the stage's lock; returns the delivery
  futures of what it queued (state records, dead letters) and, per source partition, the
  offset (next to read) that queued state covers: the reader commits that offset only once
  those futures are done (commits.py). It does not wait for the broker, except to restore
  a partition's state the first time the partition is seen.
- A partition's state is written only when the partials of its previous close are
  delivered: then its close mark and tombstones, then its state (accumulators, ids, meta),
  then the next close. While they are in flight the partition keeps applying batches in
  memory (their offsets stay uncommitted), so it never waits for the broker between
  batches. When they are delivered, a task writes and closes what those batches left
  (`_close_delivered`: under the lock, what a batch or the timer would do, its offsets to
  the reader's ledger like theirs, so commits still follow the delivered state). At the
  end of a 200,000-event backlog the last batch's windows closed 0.6 s after it, at the
  next timer tick; now 0.02 s, once the broker confirms. A crash in between restores a state that does not include a close whose
  partials may be lost: the windows close again, to the same partials (the finalizer
  replaces a source's part, so a partial delivered twice counts once), as soon as the
  state is restored (`windows_for`), before any replayed event: that event then finds
  its window closed, as the first run did.
- Why the accumulators a close removes are written before it (and deleted after it): on
  sparse traffic most accumulators open and close between two writes, so most state
  records are written only to be deleted. Writing only those still open after the close
  makes that state safe only once the close's partials are delivered, so it would wait
  for them, a round trip later than now. A crash in that time restores the state of the
  close before, and the replay closes windows where its own batches end, not where the
  published close did: a window closed at an earlier offset is published again without
  the events after that point, which take the late path (counted in its `~late` partial
  within the allowed lateness, dead-lettered beyond it, where the first publication had
  counted them). Now the state a close starts from goes out with its partials, and a
  replay starts at the close's point. Not done: not proven exact in every case.
- `poll()` (the timer, every second): re-seeks partitions left with an offset gap,
  closes windows of partitions whose traffic stopped, writes what is ready; returns what
  to commit after, as `submit` does.
- A partition that has seen no event sends no close mark, which holds the finalizer back
  (finalizing.py), until the timer declares it empty: once it has been at its end, without
  an event, for `worker.idle_close_s` of wall time since it was assigned (its clock starts
  again after a pause and whenever the broker holds messages for it), the idleness rule of
  a partition whose traffic stopped, as a watermark's idleness timeout in Flink or Kafka
  Streams. Only then does its mark say EMPTY, and the others' windows are final without
  it; events it brings later are a backfill (the windows published again, revision n).
  Declared at once, a partition whose first batch the worker had not fetched yet let the
  partitions fetched first publish their windows short: revision 1, judged by the rules.
- `revoke(partitions)`: waits for their partials in flight, writes their state, forgets
  them; returns the deliveries to wait for before the revoke may return.
- `join()` (a clean stop): the same for every partition still held.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol

import msgspec

from llmpulse import metrics
from llmpulse.config import Settings
from llmpulse.kafka import topics as T
from llmpulse.schemas import CallEvent, DeadLetter, Feedback, GpuSample
from llmpulse.schemas.codec import decode, encode
from llmpulse.schemas.fast import decode_calls
from llmpulse.schemas.host import HostSample
from llmpulse.schemas.partials import CloseMark, DimensionSetState, encode_partials, window_messages
from llmpulse.streams import window_state as WS
from llmpulse.streams.alignment import PartitionTime, held_partitions
from llmpulse.streams.bulk_publish import Record
from llmpulse.streams.changelog_state import ChangelogState
from llmpulse.streams.commits import CommitLedger
from llmpulse.streams.contiguity import OffsetGuard, admit_messages
from llmpulse.streams.emitter import Emitter
from llmpulse.streams.finalizing import finalizer_partition, partial_key
from llmpulse.streams.positions import message_of, position
from llmpulse.streams.windowing import Partial, PartitionWindows

log = logging.getLogger(__name__)

# source topic -> (kind, model)
KINDS: dict[
    str, tuple[str, type[CallEvent] | type[GpuSample] | type[Feedback] | type[HostSample]]
] = {
    T.CALLS: ("calls", CallEvent),
    T.GPU: ("gpu", GpuSample),
    T.FEEDBACK: ("feedback", Feedback),
    T.HOST: ("host", HostSample),
}
KINDS_BY_KIND = {kind: model for kind, model in KINDS.values()}
TOPIC_OF_KIND = {kind: topic for topic, (kind, _) in KINDS.items()}
GPU_DIMENSIONS = [["host", "gpu"]]
FEEDBACK_DIMENSIONS = [[], ["model"], ["app"]]
HOST_DIMENSIONS = [["host"]]
MARK_REPEAT_S = (
    2.0  # an unchanged close mark is sent again this often (a restarted finalizer hears it)
)

Deliveries = tuple[
    list[Any], dict[tuple[str, int], int]
]  # (futures, offsets they cover: next to read)


class SourceInput(Protocol):
    """What stage 1 asks of its reader (source_reader.SourceReader)."""

    ledger: CommitLedger

    def highwater(self, topic: str, partition: int) -> int | None: ...

    async def at_end(self, topic: str, partition: int) -> bool: ...

    def seek(self, topic: str, partition: int, offset: int) -> None: ...


# (changelog topic, partition) -> its latest records (restore.py)
ReadState = Callable[[str, int], Awaitable[dict[str, Any]]]


class WindowStage:
    def __init__(
        self,
        settings: Settings,
        emitter: Emitter,
        reader: SourceInput,
        read_state: ReadState,
        state_topic: str,
        call_dimensions: dict[int, list[list[str]]],
    ) -> None:
        kcfg = settings.kafka
        self.settings = settings
        self.emitter = emitter
        self.reader = reader
        self.read_state = read_state
        self.partitions = kcfg.partitions
        self.topic_of_kind = {kind: kcfg.topic(t) for t, (kind, _) in KINDS.items()}
        self.kind_of_topic = {topic: kind for kind, topic in self.topic_of_kind.items()}
        self.partials_topic = kcfg.topic(T.PARTIALS)
        self.deadletter_topic = kcfg.topic(T.DEADLETTER)
        self.call_dimensions = call_dimensions
        # named as the Faust table that held it before, so its state restores unchanged
        self.table = ChangelogState("windows", state_topic)
        self.lock = asyncio.Lock()
        self.windows: dict[tuple[str, int], PartitionWindows] = {}
        self.restored: set[int] = set()
        self.owned: set[tuple[str, int]] = (
            set()
        )  # source (topic, partition)s; changed under the lock only
        # per (kind, partition): partial sends not yet delivered, and the close mark and
        # tombstones to write once they are (before the partition's next state)
        self.inflight: dict[
            tuple[str, int], list[tuple[list[Any], dict[str, Any] | None, list[str]]]
        ] = {}
        self.last_marks: dict[tuple[str, int], tuple[int | None, float]] = {}
        self.unpersisted: set[tuple[str, int]] = (
            set()
        )  # (kind, partition) applied past its queued state
        self.persisted: dict[
            tuple[str, int], int
        ] = {}  # (topic, partition) -> offset its queued state covers
        self.batch_futures: list[Any] = []  # dead letters of the batch in progress
        self.guard = OffsetGuard()
        # (kind, partition)s whose batch was applied while their partials were in flight
        self.deferred: set[tuple[str, int]] = set()
        self._closer: asyncio.Future[None] | None = None
        self._places: dict[tuple[str, int], tuple[bytes, int]] = {}
        self._close_again = False
        # source (topic, partition)s: the wall time since which one that has seen no event has
        # been at its end (set at assignment and after a pause; restarted while it is not)
        self.eventless_since: dict[tuple[str, int], float] = {}
        # (kind, partition)s declared empty: only these send the close mark None (EMPTY)
        self.declared_empty: set[tuple[str, int]] = set()

    # -- the contract ---------------------------------------------------------------------------
    async def submit(self, records: dict[tuple[str, int], Sequence[Any]]) -> Deliveries:
        """One bulk poll: the partitions still ours applied; the deliveries and what they cover."""
        async with self.lock:
            await self._apply({tp: msgs for tp, msgs in records.items() if tp in self.owned})
            return await self._flush()

    async def poll(self) -> Deliveries:
        """The timer: re-seek gaps, close idle partitions' windows, write what is ready."""
        async with self.lock:
            for key, offset in self.guard.due_reseeks(time.monotonic()):
                assert isinstance(key, tuple)
                topic = self.topic_of_kind[key[0]]
                log.info(
                    "%s[%d]: offset %d has not arrived yet; seeking to it again",
                    topic,
                    key[1],
                    offset,
                )
                self.reader.seek(topic, key[1], offset)
            await self._close_idle()
            return await self._flush()

    def pause(self) -> None:
        """Input paused (a rebalance, a recovery): not idleness of the traffic."""
        now = time.time()
        for pw in self.windows.values():
            if pw.last_event_wall is not None:
                pw.last_event_wall = now
        for tp in self.eventless_since:
            self.eventless_since[tp] = now

    async def assign(self, assigned: set[tuple[str, int]]) -> None:
        async with self.lock:
            self.owned = set(assigned)
            # the idle clock of a partition without events starts at its assignment
            self.eventless_since = dict.fromkeys(assigned, time.time())
            self.pause()
            # the partitions' states read side by side now (a read takes 1-3 s on Tansu),
            # not one after the other as each partition's first batch arrives
            await asyncio.gather(*(self._restore(p) for p in sorted({p for _, p in assigned})))

    async def start_offset(self, tp: tuple[str, int]) -> int | None:
        """The offset after the last one a partition's state applied (None: no state yet)."""
        async with self.lock:
            pw = await self.windows_for(self.kind_of_topic[tp[0]], tp[1])
            return None if pw.applied_message is None else pw.applied_message + 1

    async def revoke(self, revoked: set[tuple[str, int]]) -> list[Any]:
        """Let revoked partitions go: their state queued and sent; the deliveries to wait for."""
        async with self.lock:
            # the window state of partition p holds every kind's: all of them go together
            # (the range assignor gives partition p of every source topic to one member)
            partitions = {p for _, p in revoked}
            self.owned = {tp for tp in self.owned if tp[1] not in partitions}
            for kind, partition in [k for k in self.windows if k[1] in partitions]:
                # the partials in flight delivered, their close marks and tombstones written,
                # so that the next owner does not close those windows again; then the state
                await self._write(self.windows.pop((kind, partition)), partition)
            for partition in partitions:
                for kind in KINDS_BY_KIND:
                    self.guard.forget((kind, partition))
                    self.declared_empty.discard((kind, partition))
                    self.eventless_since.pop((self.topic_of_kind[kind], partition), None)
                self.restored.discard(partition)
                self.table.drop_partition(partition)
            futures, offsets = await self._flush()
            self.reader.ledger.add(futures, offsets)  # committed before the revoke returns
            return futures

    async def join(self) -> None:
        """A clean stop: the state of every partition applied past it queued, after its close marks."""
        async with self.lock:
            for kind, partition in sorted(self.unpersisted):
                pw = self.windows.get((kind, partition))
                if pw is None:
                    await self._await_delivered(kind, partition)
                else:
                    await self._write(pw, partition)
            self.unpersisted.clear()
            futures, offsets = await self._flush()
            self.reader.ledger.add(futures, offsets)

    def close_all(self) -> list[Partial]:
        """Every open window closed now, its partials returned, not emitted (the exit flush)."""
        return [
            p
            for pw in list(self.windows.values())
            for p in pw.close(time.time(), force=True).partials
        ]

    # -- state --------------------------------------------------------------------------------------
    async def _flush(self) -> Deliveries:
        """Send the queued state; its deliveries (and the batch's dead letters) and the offsets they cover."""
        futures = await self.table.flush(self.emitter.publish) + self.batch_futures
        offsets, self.persisted, self.batch_futures = self.persisted, {}, []
        return futures, offsets

    async def _restore(self, partition: int) -> None:
        """Load one partition's state from its changelog, read to its true end (restore.py)."""
        if partition in self.restored:
            return
        # the records queued for it go first: the read's barrier must follow them
        self.reader.ledger.add(await self.table.flush(self.emitter.publish), {})
        await asyncio.gather(*(f for futures, _ in self.reader.ledger.entries for f in futures))
        self.table.restore(partition, await self.read_state(self.table.topic, partition))
        self.restored.add(partition)

    async def windows_for(self, kind: str, partition: int) -> PartitionWindows:
        pw = self.windows.get((kind, partition))
        if pw is not None:
            return pw
        await self._restore(partition)
        pw = self.windows.get((kind, partition))
        if pw is not None:
            return pw
        wcfg = self.settings.worker
        dims: dict[int, list[list[str]]] | list[list[str]] = (
            self.call_dimensions if kind == "calls"
            else {"gpu": GPU_DIMENSIONS, "host": HOST_DIMENSIONS}.get(kind, FEEDBACK_DIMENSIONS)
        )  # fmt: skip
        pw = PartitionWindows(
            kind,
            f"{kind}:{partition}",
            wcfg.windows_s,
            wcfg.grace_s,
            wcfg.idle_close_s,
            dims,
            wcfg.dedup_horizon_s,
            wcfg.allowed_lateness_s,
        )
        prefix = f"{partition}|{kind}|"
        # id chunks of a batch whose meta was never written are replayed: delete them
        for key in WS.load(pw, partition, self.table.take_restored(prefix)):
            del self.table[key]
        self.windows[(kind, partition)] = pw
        if pw.max_ts_ms is not None:
            # the close this state was written before (a batch's state, then its close): again
            # now, before any replayed event, at the same mark (its partials may be lost; sent
            # twice they count once). Applied first, an event of a window that close ended
            # would be counted on time where the first run counted it late
            await self._close_and_emit(pw, partition)
        return pw

    def _persist(self, pw: PartitionWindows, partition: int) -> None:
        """Queue the partition's changed state; its close marks in flight must be written first."""
        self.unpersisted.discard((pw.kind, partition))
        if pw.applied_message is not None:
            self.persisted[(self.topic_of_kind[pw.kind], partition)] = pw.applied_message + 1
        WS.write_batch(self.table, partition, pw)

    # -- applying a batch ---------------------------------------------------------------------------
    async def _seek(self, topic: str, partition: int, offset: int) -> None:
        self.reader.seek(topic, partition, offset)

    async def _apply(self, records: dict[tuple[str, int], Sequence[Any]]) -> None:
        """Stage 1 on one poll's records, by (topic, partition), each in offset order."""
        now = time.time()
        dead: list[DeadLetter] = []
        ready: list[tuple[PartitionWindows, int]] = []
        for (topic, partition), msgs in records.items():
            kind = self.kind_of_topic[topic]
            pw = await self.windows_for(kind, partition)
            msgs = await admit_messages(
                self.guard, (kind, partition), pw.applied_message, msgs, self._seek
            )
            if not msgs:
                continue
            batch: list[tuple[int, Any]] = []
            model = KINDS_BY_KIND[kind]
            events_in = 0
            for msg in msgs:
                decoded = decode_calls(msg.value) if kind == "calls" else decode(msg.value, model)
                events_in += len(decoded.valid) + len(decoded.rejected)
                for i, rej in enumerate(decoded.rejected):
                    dead.append(
                        DeadLetter.for_bytes(
                            rej.raw, rej.reason, kind="invalid", source=msg.topic,
                            partition=msg.partition, offset=msg.offset,
                            dead_letter_id=f"{msg.topic}-{msg.partition}-{msg.offset}-{i}",
                        )
                    )  # fmt: skip
                valid = decoded.valid
                base = position(msg.offset, 0)
                if len(valid) == 1:
                    batch.append((base, valid[0]))
                else:
                    batch.extend(zip(range(base, base + len(valid)), valid, strict=True))
            metrics.EVENTS_IN.labels("worker", kind).inc(events_in)
            applied = pw.apply(batch, now)
            if applied.duplicates:
                metrics.DUPLICATES.labels(kind).inc(applied.duplicates)
            if applied.revised:
                metrics.LATE_REVISED.labels(kind).inc(applied.revised)
            for late in applied.late:
                ev = late.event
                dead.append(
                    DeadLetter.for_bytes(
                        msgspec.json.encode(ev) if isinstance(ev, msgspec.Struct) else encode(ev),
                        f"late event: its {pw.windows_s[0]} s window ended at {late.window_end_ms} ms, more than "
                        f"the allowed lateness ({pw.lateness_ms / 1000:g} s, worker.allowed_lateness_s) before "
                        f"the partition's close mark {pw.close_mark_ms} ms",
                        kind="late",
                        source=topic,
                        partition=partition,
                        offset=message_of(late.offset),
                        dead_letter_id=f"late-{kind}-{partition}-{late.offset}",
                    )
                )
            pw.consumed_through(
                msgs[-1].offset
            )  # in offset order; admit_messages kept those past the state
            self.unpersisted.add((kind, partition))
            if all(f.done() for f in self._inflight(kind, partition)):
                # the partials of its last close are delivered: write their close mark, then
                # the state, then close (below). Otherwise (_defer) all three wait for their
                # delivery or a later batch: the state stays in memory and its offsets
                # uncommitted meanwhile, so a partition never waits for the broker between
                # its batches.
                ready.append((pw, partition))
            else:
                self._defer(kind, partition)
        for d in dead:
            metrics.DEAD_LETTERS.labels("worker", d.kind).inc()
            # committed with the batch: the dead letters are delivered before its offsets commit
            self.batch_futures.append(
                await self.emitter.send(self.deadletter_topic, d.source.encode(), encode(d))
            )
        for pw, partition in ready:
            await self._write_and_close(pw, partition)

    # -- closing windows ----------------------------------------------------------------------------
    def _defer(self, kind: str, partition: int) -> None:
        """Write and close the partition once its partials in flight are delivered, even if
        no batch of it follows (the end of a backlog): `_close_delivered` then."""
        self.deferred.add((kind, partition))
        asyncio.gather(*self._inflight(kind, partition), return_exceptions=True).add_done_callback(
            self._start_closer
        )

    def _start_closer(self, _: Any = None) -> None:
        self._close_again = True
        if self._closer is None or self._closer.done():
            self._closer = asyncio.ensure_future(self._close_delivered())

    async def _close_delivered(self) -> None:
        """The deferred partitions whose partials are delivered: their close marks and
        tombstones, their state, then their next close, as a batch of theirs would do; the
        offsets that state covers go to the ledger. A failed delivery is left to the next
        batch or the timer, which raise it."""
        while self._close_again:
            self._close_again = False
            try:
                async with self.lock:
                    for kind, partition in sorted(self.deferred):
                        sent = self._inflight(kind, partition)
                        if not all(f.done() for f in sent) or any(f.exception() for f in sent):
                            continue
                        self.deferred.discard((kind, partition))
                        pw = self.windows.get((kind, partition))
                        if pw is None or (kind, partition) not in self.unpersisted:
                            continue  # revoked, or written meanwhile by a batch, the timer or join
                        await self._write_and_close(pw, partition)
                    futures, offsets = await self._flush()
                    self.reader.ledger.add(futures, offsets)
            except Exception:  # what it left is written by the next batch or the timer
                log.exception("closing the windows of delivered partitions failed")

    def _inflight(self, kind: str, partition: int) -> list[Any]:
        """The sends of the partition's closes whose close marks and tombstones are not written yet."""
        return [f for sent, _, _ in self.inflight.get((kind, partition), ()) for f in sent]

    async def _write(self, pw: PartitionWindows, partition: int) -> None:
        """The partition's partials in flight delivered and their close marks and tombstones
        queued, then its state if applied past what is queued: the order a crash needs (the
        module docstring), for a batch, the timer, a revoke and a clean stop alike."""
        await self._await_delivered(pw.kind, partition)
        if (pw.kind, partition) in self.unpersisted:
            self._persist(pw, partition)

    async def _write_and_close(self, pw: PartitionWindows, partition: int) -> None:
        """Write what the partition's delivered closes and batches left (`_write`), then close
        its windows: their partials go out only after the state that precedes them."""
        await self._write(pw, partition)
        await self._close_and_emit(pw, partition)

    async def _close_and_emit(self, pw: PartitionWindows, partition: int) -> list[Partial]:
        before = pw.close_mark_ms
        res = pw.close(time.time())
        # one message per window (and chunk of its dimension sets), not per dimension set
        # (the late events of a closed window come as source `<source>~late`, windowing.py)
        by_window: dict[tuple[int, int, str], list[DimensionSetState]] = {}
        for p in res.partials:
            sets = by_window.get((p.window_s, p.start_ms, p.source))
            if sets is None:
                sets = by_window[(p.window_s, p.start_ms, p.source)] = []
            sets.append(DimensionSetState(p.dims_key, p.dims, p.state))
        records: list[Record] = []
        for (window_s, start_ms, source), sets in by_window.items():
            key, fp = self._partials_place(pw.kind, window_s)
            for msg in window_messages(pw.kind, window_s, start_ms, source, sets):
                records.append((fp, key, encode_partials(msg)))
        mark = res.mark_ms  # None: this partition has seen no event yet
        last = self.last_marks.get((pw.kind, partition))
        now = time.monotonic()
        # None (EMPTY) only once the timer declared the partition empty: until then no mark
        # at all, and the finalizer waits for it (`_declare_if_idle`)
        claims = mark is not None or (pw.kind, partition) in self.declared_empty
        if claims and (last is None or last[0] != mark or now - last[1] > MARK_REPEAT_S):
            body = encode_partials(CloseMark(pw.kind, pw.source, mark))
            records += [(fp, None, body) for fp in range(self.partitions)]
            self.last_marks[(pw.kind, partition)] = (mark, now)
        # in one call, not one awaited send each (a close of sparse traffic is dozens of
        # windows): each partials partition gets its records in this order, its windows
        # before the close mark that says they are complete (emitter.py)
        futures = await self.emitter.publish(self.partials_topic, records) if records else []
        # the close mark and then the tombstones, once the partials are delivered: a state
        # restored in between never closes a window again without the accumulators it
        # already published. Not awaited here: the next batch is processed meanwhile.
        meta = (
            pw.meta_state() if (res.partials or res.removed or pw.close_mark_ms != before) else None
        )
        removed = WS.closed_keys(partition, pw, res)
        self.inflight.setdefault((pw.kind, partition), []).append((futures, meta, removed))
        return res.partials

    def _partials_place(self, kind: str, window_s: int) -> tuple[bytes, int]:
        """The key and the partials partition of a window size's messages (computed once)."""
        place = self._places.get((kind, window_s))
        if place is None:
            key = partial_key(kind, window_s)
            place = self._places[(kind, window_s)] = (key, finalizer_partition(kind, window_s, self.partitions))
        return place

    async def _await_delivered(self, kind: str, partition: int) -> None:
        """Wait for a partition's partials in flight, then write the close marks and tombstones."""
        futures = self._inflight(kind, partition)
        pending = self.inflight.pop((kind, partition), None)
        if not pending:
            return
        if futures:
            await asyncio.gather(*futures)
        table = self.table
        for _, meta, removed in pending:
            if meta is not None:
                table[WS.meta_key(partition, kind)] = meta
            for k in removed:
                if k in table:
                    del table[k]

    async def _close_idle(self) -> None:
        now = time.time()
        for topic, partition in sorted(self.owned):
            kind = self.kind_of_topic[topic]
            pw = await self.windows_for(kind, partition)
            if self._has_backlog((topic, partition), pw):
                pw.last_event_wall = now  # behind, not idle: its next events are already waiting
            await self._write(pw, partition)
            if not pw.seen_event and not await self._declare_if_idle(kind, topic, partition, now):
                continue  # no event yet, not declared empty: no mark, so the finalizer waits for it
            await self._close_and_emit(pw, partition)

    async def _declare_if_idle(self, kind: str, topic: str, partition: int, now: float) -> bool:
        """Whether a partition that has seen no event is declared empty (now or before): at its
        end, without an event, for `idle_close_s` of wall time since it was assigned (the module
        docstring: declared at once, it let the partitions fetched first publish short windows)."""
        if (kind, partition) in self.declared_empty:
            return True
        tp = (topic, partition)
        since = self.eventless_since.setdefault(tp, now)
        if not await self.reader.at_end(topic, partition):
            # messages wait for it, or its end is not known yet (before its first fetch): not idle
            self.eventless_since[tp] = now
            return False
        if now - since < self.settings.worker.idle_close_s:
            return False
        self.declared_empty.add((kind, partition))
        log.info(
            "%s[%d]: at its end without an event for %.0f s; declared empty", topic, partition, now - since
        )
        return True

    def held(self) -> set[tuple[str, int]]:
        """The source partitions the reader is not to read now: more than
        `worker.max_source_skew_s` of event time ahead of the slowest of their kind that has a
        backlog (alignment.py). Read between batches, from the reader's task."""
        skew_s = self.settings.worker.max_source_skew_s
        if not skew_s:
            return set()
        times: dict[tuple[str, int], PartitionTime] = {}
        for tp in self.owned:
            pw = self.windows.get((self.kind_of_topic[tp[0]], tp[1]))
            if pw is not None:
                times[tp] = PartitionTime(pw.kind, pw.max_ts_ms, self._has_backlog(tp, pw))
        return held_partitions(times, round(skew_s * 1000))

    def _has_backlog(self, tp: tuple[str, int], pw: PartitionWindows) -> bool:
        """Whether the broker holds messages of the partition past what the state applied.

        Idle closing is for traffic that stopped; a partition that is merely behind (a
        rebalance, a restore, a slow moment) must not have its windows closed by the clock."""
        applied = pw.applied_message
        if applied is None:
            return False
        high = self.reader.highwater(*tp)
        return high is not None and high > applied + 1


def call_dimensions(settings: Settings, rules: Any) -> dict[int, list[list[str]]]:
    """The dimension sets of call windows per window size: the configured ones
    (WorkerConfig.dimensions_by_window), plus the sets the rules judge at that size, plus,
    at the smallest size, the set the Prometheus LLM metrics are labelled by
    (llmpulse.sinks.prometheus reads the smallest window)."""
    out = settings.worker.dimensions_by_window()
    lm = settings.llm_metrics
    wanted: list[tuple[int, list[str]]] = [(min(out), list(lm.labels))] if lm.enabled else []
    engine = getattr(rules, "engine", None)
    for rule in getattr(getattr(engine, "rules", None), "rules", ()):
        if getattr(rule, "kind", None) == "calls" and getattr(rule, "window", None) in out:
            wanted += [(rule.window, list(dims)) for dims in rule.dim_sets]
    for size, dims in wanted:
        if sorted(dims) not in [sorted(d) for d in out[size]]:
            out[size].append(dims)
    return out


def sources_of(partitions: int) -> dict[str, Iterable[str]]:
    """The source names a finalizer waits for, per kind: one per source partition."""
    return {kind: [f"{kind}:{p}" for p in range(partitions)] for kind, _ in KINDS.values()}
