"""The Faust app: source partitions -> window partials -> final aggregates, rules and alerts.

Stage 1 reads calls, GPU samples, feedback and host samples in bulk with its own
consumer (llmpulse.streams.source_reader: why, and what is committed after what), keeps event-time
windows per source partition (llmpulse.streams.windowing) and publishes, for each
closed window, one message holding all its dimension sets (llmpulse.schemas.partials)
to the internal `partials` topic keyed by kind and window size (so every dimension set
of a window meets in one finalizer, which lets an alert on the global set name the model
or key behind it), followed by the partition's close mark sent to every partials partition. Stage 2 (`finalize` agent) merges partials from all source
partitions (llmpulse.streams.finalizing), publishes each final window once to
`aggregates` under a deterministic key, and runs the rules, publishing alerts.

All state lives in changelogs whose keys carry their partition, so a restarted or
rebalanced worker recovers exactly what it owned: stage 1's is written straight to its
changelog partition (llmpulse.streams.changelog_state), stage 2's in a Faust table.
Faust's windowed tables are not used: they close on wall-clock time (faust-streaming
#250, PR #758).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import faust
import msgspec
from faust.types import TP

from llmpulse import metrics
from llmpulse.config import Settings
from llmpulse.kafka import topics as T
from llmpulse.schemas import Alert, CallEvent, DeadLetter, Feedback, GpuSample, WindowAggregate
from llmpulse.schemas.codec import decode, encode
from llmpulse.schemas.fast import decode_calls
from llmpulse.schemas.host import HostSample
from llmpulse.schemas.partials import (
    CloseMark,
    DimensionSetState,
    decode_partials,
    encode_partials,
    window_messages,
)
from llmpulse.streams import state_keys as SK
from llmpulse.streams.bulk_publish import Record, publish_bulk
from llmpulse.streams.changelog_state import ChangelogState
from llmpulse.streams.contiguity import OffsetGuard
from llmpulse.streams.credentials import aiokafka_security, faust_credentials
from llmpulse.streams.dedup import chunk_key_parse, chunk_key_text
from llmpulse.streams.finalizing import Finalizer, StoredFinalizer, finalizer_partition, partial_key
from llmpulse.streams.positions import position
from llmpulse.streams.restore import read_changelog_partition
from llmpulse.streams.rules.engine import has_open_alerts
from llmpulse.streams.rules.rootcause import explain_window
from llmpulse.streams.source_reader import SourceReader
from llmpulse.streams.tables import PartitionedTable, state_key
from llmpulse.streams.windowing import AccKey, Partial, PartitionWindows

log = logging.getLogger(__name__)

KINDS: dict[str, tuple[str, type[CallEvent] | type[GpuSample] | type[Feedback] | type[HostSample]]] = {
    T.CALLS: ("calls", CallEvent),
    T.GPU: ("gpu", GpuSample),
    T.FEEDBACK: ("feedback", Feedback),
    T.HOST: ("host", HostSample),
}
GPU_DIMENSIONS = [["host", "gpu"]]
FEEDBACK_DIMENSIONS = [[], ["model"], ["app"]]
HOST_DIMENSIONS = [["host"]]
SEP = "\x1f"

# (aggregate, rule state or None) -> (alerts, new rule state or None)
RulesHook = Callable[[WindowAggregate, dict[str, Any] | None], tuple[list[Alert], dict[str, Any] | None]]


def _acc_key_text(key: AccKey) -> str:
    return f"{key[0]}|{SEP.join(key[1])}"


def _acc_key_parse(text: str) -> AccKey:
    start, _, tup = text.partition("|")
    return int(start), tuple(tup.split(SEP))


class WorkerRuntime:
    def __init__(self, settings: Settings, bootstrap: str, rules: RulesHook | None = None) -> None:
        self.settings = settings
        kcfg = settings.kafka
        wcfg = settings.worker
        self.rules = rules
        self.partitions = kcfg.partitions
        self.app = faust.App(
            f"{kcfg.topic_prefix}worker",
            broker=[f"kafka://{b}" for b in bootstrap.split(",")],
            broker_credentials=faust_credentials(T.client_security(kcfg)),
            store="memory://",
            topic_partitions=kcfg.partitions,
            topic_replication_factor=kcfg.replication_factor,
            broker_session_timeout=kcfg.session_timeout_ms / 1000,
            broker_heartbeat_interval=max(0.5, kcfg.session_timeout_ms / 6000),
            broker_commit_interval=1.0,
            consumer_auto_offset_reset="earliest",
            web_enabled=False,
            table_standby_replicas=0,
            producer_linger_ms=5,
            producer_max_batch_size=1_000_000,
            producer_max_request_size=10_000_000,
            consumer_max_fetch_size=10_000_000,
            stream_buffer_maxsize=max(4096, wcfg.batch_max_messages * 2),
        )
        # Faust stops feeding the streams while more than `max_messages` (100) changelog
        # writes wait in its producer buffer; one batch writes hundreds of window states
        self.app.producer.buffer.max_messages = 100_000
        self.topic_names = {name: kcfg.topic(name) for name in T.ALL_TOPICS}
        self.kind_of_topic = {kcfg.topic(t): kind for t, (kind, _) in KINDS.items()}
        def raw_topic(*names: str) -> Any:
            return self.app.topic(*names, key_serializer="raw", value_serializer="raw")

        self.partials_topic = raw_topic(kcfg.topic(T.PARTIALS))
        self.alerts_topic = raw_topic(kcfg.topic(T.ALERTS))
        self.deadletter_topic = raw_topic(kcfg.topic(T.DEADLETTER))
        # named as the Faust table that held it before, so its state restores unchanged
        self.window_table = ChangelogState("windows", f"{self.app.conf.id}-windows-changelog")
        self.final_table = self._table("final")
        self.bootstrap = bootstrap
        self.restored_partitions: set[tuple[str, int]] = set()
        self.open_alerts: set[str] = set()  # rule-state keys with a firing alert
        self.changelog_topics = {self.final_table.changelog_topic.get_topic_name(), kcfg.topic(T.PARTIALS)}
        self.windows: dict[tuple[str, int], PartitionWindows] = {}
        self.finalizers: dict[int, StoredFinalizer] = {}
        # stage 1 and stage 2 hold separate state: each has its lock, so they overlap
        self.windows_lock = asyncio.Lock()
        self.final_lock = asyncio.Lock()
        # per source partition: partial sends not yet awaited, and the close mark and
        # tombstones to write once they are delivered (before the partition's next state)
        self.inflight: dict[tuple[str, int], list[tuple[list[Any], dict[str, Any] | None, list[str]]]] = {}
        self.last_marks: dict[tuple[str, int], tuple[int | None, float]] = {}
        self.guard = OffsetGuard()
        self.flush_on_exit = wcfg.flush_open_windows_on_exit
        self.call_dimensions = call_dimensions(settings, rules)
        self.sources: dict[str, Iterable[str]] = {
            kind: [f"{kind}:{p}" for p in range(self.partitions)] for kind, _ in KINDS.values()
        }
        self.reader = SourceReader(
            bootstrap, f"{self.app.conf.id}-sources", [kcfg.topic(t) for t in KINDS],
            aiokafka_security(T.client_security(kcfg)), self.process_batch, self.sources_revoked,
            self.sources_assigned, self.source_start, max_records=wcfg.batch_max_messages, session_timeout_ms=kcfg.session_timeout_ms,
            poll_ms=max(1, round(wcfg.batch_within_s * 1000)),
        )  # fmt: skip
        self.sources_owned: set[tuple[str, int]] = set()  # changed under windows_lock only
        self.unpersisted: set[tuple[str, int]] = set()  # (kind, partition) applied past its queued state
        self.persisted: dict[tuple[str, int], int] = {}  # (topic, partition) -> offset its queued state covers
        self.batch_futures: list[Any] = []  # dead letters of the batch in progress
        self._wire()

    def _table(self, name: str) -> PartitionedTable:
        table = PartitionedTable(
            self.app,
            name=name,
            default=None,
            partitions=self.partitions,
            beacon=self.app.tables.beacon,
        )
        self.app.tables.add(table)
        return table

    # -- wiring ---------------------------------------------------------------------------------
    def _wire(self) -> None:
        @self.app.task  # type: ignore[untyped-decorator]
        async def read_sources() -> None:
            await self.reader.run()

        @self.app.agent(self.partials_topic, name="finalize")
        async def finalize_agent(stream: Any) -> None:
            async for events in stream.take_events(5000, within=0.2):
                await asyncio.shield(self._locked(self.final_lock, self.process_partials, events))

        @self.app.timer(interval=1.0)  # type: ignore[untyped-decorator]
        async def tick() -> None:
            if not self.reader.ready:
                # no idle closing while paused for a rebalance or a recovery
                now = time.time()
                for pw in self.windows.values():
                    if pw.last_event_wall is not None:
                        pw.last_event_wall = now
            else:
                async with self.windows_lock:
                    await self.reseek()
                    await self.close_idle()
                    futures, offsets = await self._flush_state()
                self.reader.ledger.add(futures, offsets)
            if self._ready():
                async with self.final_lock:
                    await self.sweep_quiet()

        @self.app.on_partitions_revoked.connect  # type: ignore[arg-type]
        async def on_revoked(app: Any, revoked: set[Any], **_: Any) -> None:
            for tp in revoked:
                if tp.topic in self.changelog_topics:
                    self.restored_partitions.discard((self.final_table.name, tp.partition))
                if tp.topic == self.topic_names[T.PARTIALS]:
                    self.finalizers.pop(tp.partition, None)
                    self.guard.forget(("partials", tp.partition))

        @self.app.on_before_shutdown.connect  # type: ignore[arg-type]
        async def on_shutdown(app: Any, **_: Any) -> None:
            await self.reader.halt()
            await self.persist_all()  # the state as it was before the exit flush closes anything
            if self.flush_on_exit:
                await self.flush_everything()
            await self.reader.stop()

    @staticmethod
    async def _locked(
        lock: asyncio.Lock, fn: Callable[[Sequence[Any]], Awaitable[None]], events: Sequence[Any]
    ) -> None:
        async with lock:
            await fn(events)

    async def _publish(self, topic: str, records: list[Record]) -> list[Awaitable[Any]]:
        """Records in bulk through the app's producer (one producer: in order per partition)."""
        # the aiokafka producer under Faust's: its record batches, not Faust's per-message send
        return await publish_bulk(self.app.producer._ensure_producer(), topic, records)  # type: ignore[attr-defined]

    def _ready(self) -> bool:
        app = self.app
        try:
            recovered = app.tables.recovery.completed.is_set()  # type: ignore[attr-defined]
        except AttributeError:  # pragma: no cover
            recovered = True
        return bool(recovered and not app.rebalancing)

    # -- stage 1's input (source_reader.py) ------------------------------------------------------
    async def process_batch(
        self, records: dict[tuple[str, int], Sequence[Any]]
    ) -> tuple[list[Any], dict[tuple[str, int], int]]:
        """One bulk poll: stage 1 on the partitions still ours; the state deliveries and what they cover."""
        async with self.windows_lock:
            await self.process_sources({tp: msgs for tp, msgs in records.items() if tp in self.sources_owned})
            return await self._flush_state()

    async def _flush_state(self) -> tuple[list[Any], dict[tuple[str, int], int]]:
        """Send the queued state; its deliveries (and the batch's dead letters) and the offsets they cover."""
        futures = await self.window_table.flush(self._publish) + self.batch_futures
        offsets, self.persisted, self.batch_futures = self.persisted, {}, []
        return futures, offsets

    async def sources_assigned(self, assigned: set[tuple[str, int]]) -> None:
        async with self.windows_lock:
            self.sources_owned = set(assigned)
            # a rebalance pauses every partition: that pause is not idleness of the traffic
            now = time.time()
            for pw in self.windows.values():
                if pw.last_event_wall is not None:
                    pw.last_event_wall = now
            # the partitions' states read side by side now (a read takes 1-3 s on Tansu),
            # not one after the other as each partition's first batch arrives
            await asyncio.gather(*(self.restored(self.window_table, p) for p in sorted({p for _, p in assigned})))

    async def source_start(self, tp: tuple[str, int]) -> int | None:
        """The offset after the last one a partition's state applied (None: no state yet)."""
        async with self.windows_lock:
            pw = await self.windows_for(self.kind_of_topic[tp[0]], tp[1])
            return None if pw.applied_message is None else pw.applied_message + 1

    async def sources_revoked(self, revoked: set[tuple[str, int]]) -> list[Any]:
        """Let revoked partitions go: their state queued and sent; the deliveries to wait for."""
        async with self.windows_lock:
            # the window state of partition p holds every kind's: all of them go together
            # (the range assignor gives partition p of every source topic to one member)
            partitions = {p for _, p in revoked}
            self.sources_owned = {tp for tp in self.sources_owned if tp[1] not in partitions}
            for kind, partition in [k for k in self.windows if k[1] in partitions]:
                pw = self.windows.pop((kind, partition))
                # the partials in flight delivered, their close marks and tombstones written,
                # so that the next owner does not close those windows again; then the state
                await self.await_delivered(kind, partition)
                if (kind, partition) in self.unpersisted:
                    self._persist(pw, partition)
            for partition in partitions:
                for kind in KINDS_BY_KIND:
                    self.guard.forget((kind, partition))
                self.restored_partitions.discard((self.window_table.name, partition))
                self.window_table.drop_partition(partition)
            futures, offsets = await self._flush_state()
            self.reader.ledger.add(futures, offsets)  # committed before the revoke returns
            return futures

    async def persist_all(self) -> None:
        """Queue the state of every partition applied past it (a clean stop), after its close marks."""
        async with self.windows_lock:
            for kind, partition in sorted(self.unpersisted):
                pw = self.windows.get((kind, partition))
                await self.await_delivered(kind, partition)
                if pw is not None:
                    self._persist(pw, partition)
            self.unpersisted.clear()
            futures, offsets = await self._flush_state()
            self.reader.ledger.add(futures, offsets)

    # -- stage 1 ----------------------------------------------------------------------------------
    async def restored(self, table: PartitionedTable | ChangelogState, partition: int) -> None:
        """Load one partition of a table from its changelog, read to its true end (restore.py)."""
        key = (table.name, partition)
        if key in self.restored_partitions:
            return
        if isinstance(table, ChangelogState):
            topic = table.topic
            # the records queued for it go first: the barrier must follow them
            self.reader.ledger.add(await table.flush(self._publish), {})
            await asyncio.gather(*(f for futures, _ in self.reader.ledger.entries for f in futures))
        else:
            topic = table.changelog_topic.get_topic_name()
        state = await asyncio.to_thread(
            read_changelog_partition, self.bootstrap, topic, partition, T.client_security(self.settings.kafka)
        )
        prefix = f"{partition}|"
        data = table.data
        for k in [k for k in list(data.keys()) if isinstance(k, str) and k.startswith(prefix)]:
            del data[k]
        for k, v in state.items():
            data[k] = v
            if table is self.final_table and (p := SK.parse(k)) is not None and p.shape == "R" and has_open_alerts(v):
                self.open_alerts.add(k)
        self.restored_partitions.add(key)

    async def windows_for(self, kind: str, partition: int) -> PartitionWindows:
        pw = self.windows.get((kind, partition))
        if pw is not None:
            return pw
        await self.restored(self.window_table, partition)
        pw = self.windows.get((kind, partition))
        if pw is not None:
            return pw
        wcfg = self.settings.worker
        dims: dict[int, list[list[str]]] | list[list[str]] = (
            self.call_dimensions if kind == "calls"
            else {"gpu": GPU_DIMENSIONS, "host": HOST_DIMENSIONS}.get(kind, FEEDBACK_DIMENSIONS)
        )  # fmt: skip
        pw = PartitionWindows(
            kind, f"{kind}:{partition}", wcfg.windows_s, wcfg.grace_s, wcfg.idle_close_s, dims, wcfg.dedup_horizon_s,
            wcfg.allowed_lateness_s,
        )
        prefix = f"{partition}|{kind}|"
        for key, value in list(self.window_table.items()):
            if not isinstance(key, str) or not key.startswith(prefix) or value is None:
                continue
            rest = key[len(prefix) :]
            if rest == "M":
                pw.restore_meta(value)
            elif rest.startswith("A|"):
                pw.restore_acc(_acc_key_parse(rest[2:]), value)
            elif rest.startswith("L|"):
                pw.restore_late(_acc_key_parse(rest[2:]), value)
            elif rest.startswith("D|"):
                pw.seen.restore_chunk(chunk_key_parse(rest[2:]), value)
        # id chunks of a batch whose meta was never written are replayed: delete them
        for chunk in pw.seen.finish_restore(pw.applied_offset, pw.close_mark_ms):
            del self.window_table[state_key(partition, kind, "D", chunk_key_text(chunk))]
        self.windows[(kind, partition)] = pw
        return pw

    async def process_sources(self, records: dict[tuple[str, int], Sequence[Any]]) -> None:
        """Stage 1 on one poll's records, by (topic, partition), each in offset order."""
        now = time.time()
        dead: list[DeadLetter] = []
        closing: list[tuple[PartitionWindows, int]] = []
        for (topic, partition), msgs in records.items():
            kind = self.kind_of_topic[topic]
            pw = await self.windows_for(kind, partition)
            msgs = await self._admit((kind, partition), pw.applied_message, msgs)
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
                ev_model = late.event
                dead.append(
                    DeadLetter.for_bytes(
                        msgspec.json.encode(ev_model) if isinstance(ev_model, msgspec.Struct) else encode(ev_model),
                        f"late event: its {pw.windows_s[0]} s window ended at {late.window_end_ms} ms, more than "
                        f"the allowed lateness ({pw.lateness_ms / 1000:g} s, worker.allowed_lateness_s) before "
                        f"the partition's close mark {pw.close_mark_ms} ms",
                        kind="late", source=self.topic_names[_topic_of_kind(kind)],
                        partition=partition, offset=late.offset >> 20,
                        dead_letter_id=f"late-{kind}-{partition}-{late.offset}",
                    )
                )
            pw.consumed_through(msgs[-1].offset)  # in offset order; _admit kept those past the state
            self.unpersisted.add((kind, partition))
            if self._delivered(kind, partition):
                # the partials of its last close are delivered: write their close mark, then
                # the state, then close. Otherwise all three wait for a later batch (or the
                # tick): the state stays in memory and its offsets uncommitted meanwhile, so
                # a partition never waits for the broker between its batches.
                await self.await_delivered(kind, partition)
                self._persist(pw, partition)
                closing.append((pw, partition))
        for d in dead:
            metrics.DEAD_LETTERS.labels("worker", d.kind).inc()
            # committed with the batch: the dead letters are delivered before its offsets commit
            self.batch_futures.append(await self.deadletter_topic.send(key=d.source.encode(), value=encode(d)))
        for pw, partition in closing:
            await self.close_and_emit(pw, partition)

    def _delivered(self, kind: str, partition: int) -> bool:
        """Whether every partial sent for the partition so far is delivered."""
        return all(f.done() for sent, _, _ in self.inflight.get((kind, partition), ()) for f in sent)

    async def reseek(self) -> None:
        for key, offset in self.guard.due_reseeks(time.monotonic()):
            assert isinstance(key, tuple)
            kind: str = key[0]
            partition: int = key[1]
            topic = self.topic_names[T.PARTIALS] if kind == "partials" else self.topic_names[_topic_of_kind(kind)]
            log.info("%s[%d]: offset %d has not arrived yet; seeking to it again", topic, partition, offset)
            await self._seek(topic, partition, offset)

    async def _seek(self, topic: str, partition: int, offset: int) -> None:
        if topic in self.kind_of_topic:
            self.reader.seek(topic, partition, offset)
            return
        try:
            await self.app.consumer.seek(TP(topic, partition), offset)
        except Exception as exc:  # revoked meanwhile: the next owner starts from its state
            log.warning("could not seek %s[%d] to %d: %s", topic, partition, offset, exc)

    async def _admit(self, key: tuple[str, int], applied: int | None, msgs: Sequence[Any]) -> list[Any]:
        """The messages to apply: new ones, continuing the state's offsets without a gap (contiguity.py)."""
        accepted = self.guard.gaps_accepted
        adm = self.guard.admit(key, applied, [m.offset for m in msgs], time.monotonic())
        if self.guard.gaps_accepted > accepted:
            metrics.OFFSET_GAPS.labels(msgs[0].topic, "accepted").inc()
        if adm.seek_to is not None:
            metrics.OFFSET_GAPS.labels(msgs[0].topic, "rewound").inc()
            await self._seek(msgs[0].topic, msgs[0].partition, adm.seek_to)
        taken = msgs[: adm.take]
        return list(taken) if applied is None else [m for m in taken if m.offset > applied]

    def _persist(self, pw: PartitionWindows, partition: int) -> None:
        """Queue the partition's changed state; its close marks in flight must be written first."""
        self.unpersisted.discard((pw.kind, partition))
        if pw.applied_message is not None:
            self.persisted[(self.topic_names[_topic_of_kind(pw.kind)], partition)] = pw.applied_message + 1
        table = self.window_table
        for key in pw.take_dirty():
            table[state_key(partition, pw.kind, "A", _acc_key_text(key))] = pw.acc_state(key)
        for key in pw.take_late_dirty():
            table[state_key(partition, pw.kind, "L", _acc_key_text(key))] = pw.late_state(key)
        # the ids before the meta: a chunk past the meta's applied offset is dropped on restore
        for chunk, ids in pw.seen.take_added(pw.applied_offset):
            table[state_key(partition, pw.kind, "D", chunk_key_text(chunk))] = ids
        table[state_key(partition, pw.kind, "M")] = pw.meta_state()

    async def close_and_emit(self, pw: PartitionWindows, partition: int, force: bool = False) -> list[Partial]:
        before = pw.close_mark_ms
        res = pw.close(time.time(), force=force)
        futures = []
        # one message per window (and chunk of its dimension sets), not per dimension set
        # (the late events of a closed window come as source `<source>~late`, windowing.py)
        by_window: dict[tuple[int, int, str], list[DimensionSetState]] = {}
        for p in res.partials:
            by_window.setdefault((p.window_s, p.start_ms, p.source), []).append(DimensionSetState(p.dims_key, p.dims, p.state))
        for (window_s, start_ms, source), sets in by_window.items():
            key = partial_key(pw.kind, window_s)
            fp = finalizer_partition(pw.kind, window_s, self.partitions)
            for msg in window_messages(pw.kind, window_s, start_ms, source, sets):
                futures.append(await self.partials_topic.send(key=key, value=encode_partials(msg), partition=fp))
        mark = res.mark_ms  # None: this partition has seen no event yet
        last = self.last_marks.get((pw.kind, partition))
        now = time.monotonic()
        if last is None or last[0] != mark or now - last[1] > 2.0:
            body = encode_partials(CloseMark(pw.kind, pw.source, mark))
            for fp in range(self.partitions):
                futures.append(await self.partials_topic.send(key=None, value=body, partition=fp))
            self.last_marks[(pw.kind, partition)] = (mark, now)
        # the close mark and then the tombstones, once the partials are delivered: a state
        # restored in between never closes a window again without the accumulators it
        # already published. Not awaited here: the next batch is processed meanwhile.
        meta = pw.meta_state() if (res.partials or res.removed or pw.close_mark_ms != before) else None
        removed = [state_key(partition, pw.kind, "A", _acc_key_text(r)) for r in res.removed]
        removed += [state_key(partition, pw.kind, "L", _acc_key_text(r)) for r in res.removed_late]
        removed += [state_key(partition, pw.kind, "D", chunk_key_text(c)) for c in res.removed_ids]
        self.inflight.setdefault((pw.kind, partition), []).append((futures, meta, removed))
        if force:
            await self.await_delivered(pw.kind, partition)
        return res.partials

    async def await_delivered(self, kind: str, partition: int) -> None:
        """Wait for a partition's partials in flight, then write the close marks and tombstones."""
        pending = self.inflight.pop((kind, partition), None)
        if not pending:
            return
        futures = [f for sent, _, _ in pending for f in sent]
        if futures:
            await asyncio.gather(*futures)
        table = self.window_table
        for _, meta, removed in pending:
            if meta is not None:
                table[state_key(partition, kind, "M")] = meta
            for k in removed:
                if k in table:
                    del table[k]

    async def close_idle(self) -> None:
        now = time.time()
        for topic, partition in sorted(self.sources_owned):
            kind = self.kind_of_topic[topic]
            pw = await self.windows_for(kind, partition)
            if self._has_backlog((topic, partition), pw):
                pw.last_event_wall = now  # behind, not idle: its next events are already waiting
            await self.await_delivered(kind, partition)
            if (kind, partition) in self.unpersisted:
                self._persist(pw, partition)
            if pw.applied_message is None and not await self.reader.at_end(topic, partition):
                # no event yet, and not known to have none: its close mark would say "empty",
                # and the finalizer would close every window on the other partitions' marks
                # alone (a replay's partition 1, not yet fetched, lost 5,000 s of windows)
                continue
            await self.close_and_emit(pw, partition)

    def _has_backlog(self, tp: tuple[str, int], pw: PartitionWindows) -> bool:
        """Whether the broker holds messages of the partition past what the state applied.

        Idle closing is for traffic that stopped; a partition that is merely behind (a
        rebalance, a restore, a slow moment) must not have its windows closed by the clock."""
        applied = pw.applied_message
        if applied is None:
            return False
        high = self.reader.highwater(*tp)
        return high is not None and high > applied + 1

    # -- stage 2 ----------------------------------------------------------------------------------
    async def finalizer_for(self, fp: int) -> StoredFinalizer:
        stored = self.finalizers.get(fp)
        if stored is not None:
            return stored
        await self.restored(self.final_table, fp)
        stored = self.finalizers.get(fp)
        if stored is not None:
            return stored
        self.finalizers[fp] = stored = StoredFinalizer.restore(fp, self.sources, self.final_table)
        return stored

    async def process_partials(self, events: Sequence[Any]) -> None:
        by_partition: dict[int, list[Any]] = {}
        for ev in events:
            by_partition.setdefault(ev.message.partition, []).append(ev.message)
        for fp, msgs in by_partition.items():
            stored = await self.finalizer_for(fp)
            msgs = await self._admit(("partials", fp), stored.fin.applied, msgs)
            if not msgs:
                continue
            for msg in msgs:
                try:
                    stored.apply(decode_partials(msg.value))
                except ValueError as exc:
                    log.error("unreadable partials message at %s/%s: %s", fp, msg.offset, exc)
            stored.commit(max(m.offset for m in msgs))  # _admit kept only offsets past it
            await self.finalize_ready(stored)

    async def finalize_ready(self, stored: StoredFinalizer) -> None:
        aggregates = stored.publishable()
        if aggregates:
            await self.publish_final(aggregates, stored.fp)  # delivered before the state says so
        stored.published()
        stored.expire()

    async def publish_final(self, aggregates: Iterable[WindowAggregate], fp: int) -> None:
        """Publish final aggregates and judge them; return once all is delivered.

        The aggregates go out in bulk (bulk_publish.py: one batch per partition, placed by
        key as one send each would be), the rules judge each window of a dimension set in
        window order, and each dimension set's rule state is written once per call, after
        its last window, not once per window: a replay hands this hundreds of windows of
        the same sets at once (the state is plain data the engine mutates in place; a
        crash before the write re-judges those windows, and an alert's id is deterministic)."""
        futures: list[Any] = []
        now = time.time()
        aggregates = list(aggregates)
        window_of: dict[tuple[str, int, datetime], list[WindowAggregate]] = {}
        for agg in aggregates:
            window_of.setdefault((agg.kind, agg.window_s, agg.window_start), []).append(agg)
        records: list[Record] = []
        judged: dict[str, dict[str, Any]] = {}  # rule-state key -> its state, written after the loop
        for agg in aggregates:
            records.append((None, agg.aggregate_id.encode(), encode(agg)))
            metrics.WINDOWS_CLOSED.labels(agg.kind).inc()
            metrics.WINDOW_CLOSE_DELAY.observe(max(0.0, now - agg.window_end.timestamp()))
            if self.rules is not None and agg.revision == 1:
                rkey = SK.rule_key(fp, agg.kind, agg.window_s, agg.dims_key)
                state = judged.get(rkey)
                alerts, new_state = self.rules(agg, state if state is not None else self.final_table.get(rkey))
                if alerts:
                    # root cause: which finer dimension of this window drives the deviation
                    alerts = explain_window(window_of[(agg.kind, agg.window_s, agg.window_start)], alerts)
                for alert in alerts:
                    metrics.ALERTS_PUBLISHED.labels(alert.severity, alert.state).inc()
                    futures.append(
                        await self.alerts_topic.send(key=alert.fingerprint.encode(), value=encode(alert))
                    )
                if new_state is not None:
                    judged[rkey] = new_state
        futures += await self._publish(self.topic_names[T.AGGREGATES], records)
        for rkey, state in judged.items():
            self.final_table[rkey] = state
            if has_open_alerts(state):
                self.open_alerts.add(rkey)
            else:
                self.open_alerts.discard(rkey)
        if futures:
            await asyncio.gather(*futures)

    async def sweep_quiet(self) -> None:
        """Resolve firing alerts of dimension sets whose traffic stopped (no windows, no verdicts).

        The clock is the finalizer's event time for the kind, so the outcome does not depend
        on when the sweep runs."""
        sweep = getattr(self.rules, "sweep", None)
        if sweep is None or not self.open_alerts:
            return
        futures = []
        for rkey in list(self.open_alerts):
            parsed = SK.parse(rkey)
            assert parsed is not None
            kind = parsed.kind
            stored = self.finalizers.get(parsed.partition)
            fin = None if stored is None else stored.fin
            state = self.final_table.get(rkey)
            if fin is None or state is None or kind not in fin.finalized:
                continue
            now = datetime.fromtimestamp(fin.finalized[kind] / 1000, tz=UTC)
            for alert in sweep(state, now):
                metrics.ALERTS_PUBLISHED.labels(alert.severity, alert.state).inc()
                futures.append(await self.alerts_topic.send(key=alert.fingerprint.encode(), value=encode(alert)))
            self.final_table[rkey] = state
            if not has_open_alerts(state):
                self.open_alerts.discard(rkey)
        if futures:
            await asyncio.gather(*futures)

    # -- clean stop on the embedded broker ----------------------------------------------------------
    async def flush_everything(self) -> None:
        """Close every open window now and publish it (the embedded broker keeps no state)."""
        combined = Finalizer(self.sources)
        for stored in self.finalizers.values():
            combined.windows.update(stored.fin.windows)
            combined.unpublished |= stored.fin.unpublished
        for pw in list(self.windows.values()):
            for p in pw.close(time.time(), force=True).partials:
                combined.add_partial(p)
        for kind, sources in self.sources.items():
            for src in sources:
                combined.set_mark(kind, src, int(math.ldexp(1, 60)))
        ready = combined.ready()
        log.info("flushing %d open windows on exit", len(ready))
        # judged against the rule state of the finalizer that owns each window size, as
        # process_partials would have: partition 0's holds other sizes' (or nothing)
        by_owner: dict[int, list[WindowAggregate]] = {}
        for _, agg in ready:
            by_owner.setdefault(finalizer_partition(agg.kind, agg.window_s, self.partitions), []).append(agg)
        for fp, aggs in sorted(by_owner.items()):
            await self.publish_final(aggs, fp)


KINDS_BY_KIND = {kind: model for kind, model in KINDS.values()}


def call_dimensions(settings: Settings, rules: RulesHook | None) -> dict[int, list[list[str]]]:
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


def _topic_of_kind(kind: str) -> str:
    for topic, (k, _) in KINDS.items():
        if k == kind:
            return topic
    raise KeyError(kind)
