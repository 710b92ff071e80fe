"""The sink consumer: Kafka topics -> ClickHouse tables, at least once, never twice.

In the manner of arroyo and snuba: messages are decoded into one buffer per table (the
processing step, `poll_messages` at a time); each buffer is written in INSERT batches
of its own size and age (`batch_rows`, `batch_seconds`: about one INSERT per second per
table under load); a topic's offsets are committed only after the INSERT holding their
rows has returned. While ClickHouse fails, the batch is kept and retried with backoff
and the consumer is paused (backpressure); nothing is dropped.

Exactly once in the tables, roll-ups included. Before an INSERT the sink records the
batch's Kafka offset ranges in `sink_intents`, and the INSERT carries a deduplication
token made of those ranges. A successor (after a crash between INSERT and commit, a
kill in the middle of an INSERT, or a rebalance) reads the intents beyond the committed
offsets, rebuilds those exact batches from Kafka and writes them again under the same
tokens: every table and roll-up that already holds a block skips it, the others get it.
The materialized-view roll-ups therefore never count an event twice, and raw tables
are also keyed by event id (ReplacingMergeTree) for events produced twice upstream.

When a rebalance gives the partitions of one recorded batch to different sinks (or part
of it was already committed), nobody can rebuild it whole. Each owner then rebuilds its
own part, and for a table with roll-ups writes only the events the table does not hold
yet (looked up by id within the events' time range): the recorded INSERT either landed,
and then its events are there and were rolled up, or it did not, and then they go in now.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from llmpulse import metrics
from llmpulse.config import Settings
from llmpulse.kafka.clients import consumer_settings
from llmpulse.sinks.clickhouse.rows import TABLES, TableSpec
from llmpulse.sinks.clickhouse.writer import BatchWriter, retry_forever

log = logging.getLogger(__name__)

TopicPart = tuple[str, int]

FETCH = {"max.partition.fetch.bytes": 16 << 20}
"""The sink reads large batch envelopes (~200 KB per 500 calls): librdkafka's default of 1 MiB per
partition and fetch brings a few thousand events per round trip, which capped the sink below
100,000 rows/s; 16 MiB lets one fetch carry a whole INSERT batch."""


@dataclass
class Buffer:
    """Rows of one table waiting for their INSERT, and the offsets they came from."""

    topic: str
    spec: TableSpec
    items: list[Any] = field(default_factory=list)
    ranges: dict[int, list[int]] = field(default_factory=dict)  # partition -> [first, last]
    first_ts: int = 0  # Kafka timestamp of the first message: tells a recreated topic apart
    oldest: float | None = None

    def token(self) -> str:
        parts = ",".join(f"{p}:{a}-{b}" for p, (a, b) in sorted(self.ranges.items()))
        return f"{self.topic}|{parts}|{self.first_ts}"

    def clear(self) -> None:
        self.items = []
        self.ranges = {}
        self.first_ts = 0
        self.oldest = None


@dataclass
class Replay:
    """A batch that was recorded but maybe not (fully) written: rebuilt from the same offsets."""

    topic: str
    spec: TableSpec
    token: str
    ranges: dict[int, tuple[int, int]]
    done: set[int] = field(default_factory=set)
    items: list[Any] = field(default_factory=list)
    only_missing: bool = False  # part of a batch rebuilt elsewhere too: write the events the table lacks

    @property
    def complete(self) -> bool:
        return len(self.done) == len(self.ranges)


@dataclass
class Batch:
    """A buffer's rows handed to the INSERT thread, with what its commit needs."""

    topic: str
    spec: TableSpec
    items: list[Any]
    token: str
    ranges: dict[int, tuple[int, int]]


class ClickHouseSink:
    def __init__(self, settings: Settings, bootstrap: str, client: Any, group: str | None = None) -> None:
        self.settings = settings
        self.cfg = settings.sink
        self.writer = BatchWriter(client, settings.clickhouse.database)
        self.topic_table = {settings.kafka.topic(name): spec for name, spec in TABLES.items()}
        from confluent_kafka import Consumer

        self.consumer = Consumer(
            consumer_settings(
                bootstrap,
                settings.kafka,
                group or f"{settings.kafka.topic_prefix}sink",
                **FETCH,
                **({"group.instance.id": self.cfg.instance_id} if self.cfg.instance_id else {}),
            )
        )
        self.buffers: dict[str, Buffer] = {t: Buffer(t, spec) for t, spec in self.topic_table.items()}
        # per partition, the last offset whose rows are written (INSERT returned) and not yet committed
        self.offsets: dict[TopicPart, int] = {}
        self.replays: dict[TopicPart, list[Replay]] = {}
        self.stopping = threading.Event()
        self.paused = False
        self.skipped_invalid = 0
        self.replayed_batches = 0
        # one INSERT at a time runs in this thread while the next batch is decoded (chDB and the
        # driver release the GIL while ClickHouse works); its offsets are committed once it returned
        self._inserter = ThreadPoolExecutor(1, thread_name_prefix="sink-insert")
        self._inflight: tuple[Future[None], Batch] | None = None

    @property
    def buffered(self) -> int:
        return sum(len(b.items) for b in self.buffers.values())

    # -- Kafka callbacks ------------------------------------------------------------------------
    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        # write what we hold before the partitions move, so the next owner starts after it;
        # batches still being rebuilt stay recorded: the next owner rebuilds them
        self.flush(final=True)
        self.replays.clear()
        self.offsets.clear()

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        try:
            self._plan_replays(consumer, partitions)
        except Exception as exc:  # a failing store must not stop the assignment; INSERTs will retry
            log.warning("could not read the recorded batches (%s); re-delivered events are replaced by key", exc)

    def _plan_replays(self, consumer: Any, partitions: list[Any]) -> None:
        self.replays.clear()
        committed = consumer.committed(partitions, timeout=30)
        pos: dict[TopicPart, int] = {(tp.topic, tp.partition): max(tp.offset, 0) for tp in committed}
        topics = sorted({t for t, _ in pos})
        for topic, token, ranges in reversed(self.writer.intents(topics)):
            spec = self.topic_table.get(topic)
            if spec is None or not ranges:
                continue
            if all(last < pos.get((topic, p), 0) for p, _, last in ranges):
                continue  # written and committed
            if any((topic, p) not in pos or first < pos[(topic, p)] for p, first, _ in ranges):
                # partitions elsewhere or partly committed: rebuild the part that is ours and not committed
                own = {
                    p: (max(first, pos[(topic, p)]), last)
                    for p, first, last in ranges
                    if (topic, p) in pos and last >= pos[(topic, p)]
                }
                if not spec.rolled_up or not own:
                    log.warning(
                        "batch %s cannot be rebuilt here (partitions elsewhere or partly committed); its events "
                        "are written again under a new token and replaced by key",
                        token,
                    )
                    continue
                log.warning(
                    "batch %s cannot be rebuilt whole here (partitions elsewhere or partly committed); its events "
                    "on partitions %s are written where %s lacks them",
                    token, sorted(own), spec.table,
                )  # fmt: skip
                replay = Replay(topic, spec, token, own, only_missing=True)
            else:
                replay = Replay(topic, spec, token, {p: (a, b) for p, a, b in ranges})
            for p in replay.ranges:
                self.replays.setdefault((topic, p), []).append(replay)
        n = len({id(r) for rs in self.replays.values() for r in rs})
        if n:
            log.warning("rebuilding %d recorded batch(es) from Kafka (a previous sink stopped before committing)", n)

    def start(self) -> None:
        self.consumer.subscribe(list(self.topic_table), on_assign=self._on_assign, on_revoke=self._on_revoke)

    # -- processing -------------------------------------------------------------------------------
    def submit(self, msg: Any) -> None:
        topic = msg.topic()
        part = msg.partition()
        off = msg.offset()
        key = (topic, part)
        spec = self.topic_table[topic]
        items, invalid = spec.items(msg.value())
        # invalid source events go to the dead-letter topic from the worker; here they are skipped
        self.skipped_invalid += invalid
        metrics.EVENTS_IN.labels("sink", spec.table).inc(len(items))
        buf = self.buffers[topic]
        if key in self.replays:
            if part in buf.ranges and self._replay_of(key, part, off) is not None:
                self.flush_buffer(buf, final=True)  # keep each batch's offsets contiguous
            if self._replay_take(key, part, off, items):
                return
        rng = buf.ranges.get(part)
        if rng is None:
            buf.ranges[part] = [off, off]
        else:
            rng[1] = off
        if buf.oldest is None:
            buf.oldest = time.monotonic()
            buf.first_ts = msg.timestamp()[1]
        buf.items.extend(items)

    def _replay_of(self, key: TopicPart, part: int, off: int) -> Replay | None:
        for r in self.replays.get(key, []):
            first, last = r.ranges[part]
            if first <= off <= last and part not in r.done:
                return r
        return None

    def _replay_take(self, key: TopicPart, part: int, off: int, items: list[Any]) -> bool:
        """True if this message belongs to a batch being rebuilt (then it went there)."""
        taken = False
        for r in list(self.replays.get(key, [])):
            first, last = r.ranges[part]
            if first <= off <= last and part not in r.done:
                r.items.extend(items)
                taken = True
                if off == last:
                    r.done.add(part)
            elif off > last:
                r.done.add(part)  # a compacted topic may lack the last offset
            if r.complete:
                self._write_replay(r)
        if not self.replays.get(key):
            self.replays.pop(key, None)
        return taken

    def _write_replay(self, r: Replay) -> None:
        def write() -> None:
            if not r.only_missing:
                self.writer.insert(r.spec, r.items, r.token)
                return
            col = r.spec.id_column
            have = self.writer.present_ids(r.spec, r.items)
            missing = [e for e in r.items if str(getattr(e, col)) not in have]
            # the token names exactly these events: a retry of the same rows is skipped, other rows are not
            digest = hashlib.sha256("\n".join(str(getattr(e, col)) for e in missing).encode()).hexdigest()[:32]
            parts = ",".join(f"{p}:{a}-{b}" for p, (a, b) in sorted(r.ranges.items()))
            if missing:
                log.warning("rebuilt part %s of batch %s: %d of %d events were not written yet",
                            parts, r.token, len(missing), len(r.items))  # fmt: skip
            self.writer.insert(r.spec, missing, f"{r.token}|part|{parts}|{digest}")

        ok = retry_forever(
            write,
            f"INSERT of rebuilt batch {r.token} into {r.spec.table} ({len(r.items)} rows)",
            self.cfg.retry_initial_s,
            self.cfg.retry_max_s,
            should_stop=lambda: False,
            on_wait=self._wait_paused,
        )
        assert ok
        self._written(r.topic, r.ranges.items())
        self.replayed_batches += 1
        for p in r.ranges:
            rs = self.replays.get((r.topic, p), [])
            if r in rs:
                rs.remove(r)
            if not rs:
                self.replays.pop((r.topic, p), None)
        self._commit(r.topic)

    def due(self, buf: Buffer) -> bool:
        if buf.oldest is None:
            return False
        return len(buf.items) >= self.cfg.batch_rows or time.monotonic() - buf.oldest >= self.cfg.batch_seconds

    def flush_buffer(self, buf: Buffer, final: bool = False) -> bool:
        """Record, INSERT and commit one table's batch; False if stopped before it succeeded.

        Unless `final`, the INSERT runs in the INSERT thread and this returns at once; the
        next flush (or `settle`) waits for it, then commits its offsets.
        """
        if not self.settle(final):
            return False
        if buf.oldest is None:
            return True
        batch = Batch(buf.topic, buf.spec, buf.items, buf.token(), {p: (a, b) for p, (a, b) in buf.ranges.items()})
        buf.clear()
        if not batch.items:
            return self._done(batch)
        if final:
            return self._write(batch, final)
        self._inflight = (self._inserter.submit(self._write_once, batch), batch)
        return True

    def _write_once(self, batch: Batch) -> None:
        ranges = [(p, a, b) for p, (a, b) in sorted(batch.ranges.items())]
        self.writer.record_intent(batch.spec, batch.topic, batch.token, ranges, len(batch.items))
        self.writer.insert(batch.spec, batch.items, batch.token)

    def _write(self, batch: Batch, final: bool) -> bool:
        """Record and INSERT, retrying with backoff (consumption paused) until it succeeds; commit."""
        ok = retry_forever(
            lambda: self._write_once(batch),
            f"INSERT into {batch.spec.table} ({len(batch.items)} rows)",
            self.cfg.retry_initial_s,
            self.cfg.retry_max_s,
            should_stop=lambda: self.stopping.is_set() and not final,
            on_wait=self._wait_paused,
        )
        return ok and self._done(batch)

    def _done(self, batch: Batch) -> bool:
        self._written(batch.topic, batch.ranges.items())
        self._resume()
        self._commit(batch.topic)
        return True

    def settle(self, final: bool = False) -> bool:
        """Wait for the INSERT in flight and commit it; a failed one is retried here, in the
        foreground, as `flush_buffer(final)` would (same token). False if stopped before it succeeded."""
        if self._inflight is None:
            return True
        future, batch = self._inflight
        try:
            future.result()
        except Exception as exc:
            # it stays in flight while retried: a rebalance in between (served while paused)
            # settles it first, as it flushes the buffers, before the partitions move
            log.warning("INSERT into %s (%d rows) failed (%s); retrying", batch.spec.table, len(batch.items), exc)
            ok = self._write(batch, final)
            self._inflight = None
            return ok
        self._inflight = None
        return self._done(batch)

    def _written(self, topic: str, ranges: Any) -> None:
        """These (partition, (first, last)) ranges are in ClickHouse: their offsets may be committed.
        Only written offsets are: rows still buffered (another partition's, while a recorded
        batch is being rebuilt) are never committed ahead of their INSERT."""
        for p, (_, last) in ranges:
            key = (topic, p)
            self.offsets[key] = max(self.offsets.get(key, -1), last)

    def flush(self, final: bool = False) -> bool:
        """Write every buffer (largest first) and commit; False if stopped before it succeeded.
        Unless `final`, the last INSERT may still be in flight (see `settle`)."""
        for buf in sorted(self.buffers.values(), key=lambda b: -len(b.items)):
            if not self.flush_buffer(buf, final):
                return False
        return self.settle(final) if final else True

    def _commit(self, topic: str) -> None:
        from confluent_kafka import TopicPartition

        # partitions whose recorded batches are still being rebuilt keep their committed offset;
        # partitions given away meanwhile are not ours to commit
        try:
            mine = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        except Exception:
            return
        for key in [k for k in self.offsets if k[0] == topic and k not in mine]:
            del self.offsets[key]
        tps = [
            TopicPartition(t, p, off + 1)
            for (t, p), off in self.offsets.items()
            if t == topic and (t, p) not in self.replays
        ]
        if not tps:
            return
        try:
            self.consumer.commit(offsets=tps, asynchronous=False)
        except Exception as exc:
            log.warning("offset commit failed (%s); the batch will be rebuilt and skipped by its token", exc)
            return
        for tp in tps:
            if self.offsets.get((tp.topic, tp.partition)) == tp.offset - 1:
                del self.offsets[(tp.topic, tp.partition)]

    def _wait_paused(self, delay: float) -> None:
        """Backpressure: stop fetching while ClickHouse fails, keep the group membership."""
        if not self.paused:
            try:
                self.consumer.pause(self.consumer.assignment())
                self.paused = True
            except Exception:
                pass
        end = time.monotonic() + delay
        while time.monotonic() < end:
            self.consumer.poll(0.1)  # serves heartbeats and rebalance callbacks; paused: no messages

    def _resume(self) -> None:
        if self.paused:
            with contextlib.suppress(Exception):
                self.consumer.resume(self.consumer.assignment())
            self.paused = False

    def poll_once(self, timeout: float = 0.2) -> int:
        # what is already fetched, at once; wait (up to `timeout`) only when nothing is: consume(n, t)
        # alone waits the whole `t` unless n messages arrive, 200 ms of every poll at high rates
        msgs = self.consumer.consume(self.cfg.poll_messages, 0)
        if not msgs:
            first = self.consumer.poll(timeout)
            msgs = [] if first is None else [first, *self.consumer.consume(self.cfg.poll_messages - 1, 0)]
        n = 0
        batch_rows = self.cfg.batch_rows
        for msg in msgs:
            if msg.error() is not None:
                continue
            self.submit(msg)
            n += 1
            buf = self.buffers[str(msg.topic())]
            if len(buf.items) >= batch_rows:
                self.flush_buffer(buf)
        if self._inflight is not None and self._inflight[0].done():
            self.settle()  # commit it now (or retry it, paused), not at the next flush
        for buf in self.buffers.values():
            if self.due(buf):
                self.flush_buffer(buf)
        if self.buffered >= self.cfg.max_buffered_rows:
            # backpressure: nothing more is fetched until the buffers are written
            self.flush()
        return n

    def run(self, drain_quiet_s: float = 1.0) -> None:
        """Consume until stopped; on stop, keep draining until the topics are quiet, then flush."""
        self.start()
        while not self.stopping.is_set():
            self.poll_once()
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < drain_quiet_s:
            if self.poll_once(0.2):
                quiet_since = time.monotonic()
        self.flush(final=True)
        self.consumer.close()
        self._inserter.shutdown(wait=True)

    def stop(self) -> None:
        self.stopping.set()
