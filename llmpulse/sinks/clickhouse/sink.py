"""The sink consumer: Kafka topics -> ClickHouse tables, at least once, never twice.

The work is four steps, composed in commit order (as arroyo / snuba strategies; each in
steps/, with its contract in its docstring):

    Decode -> BatchByTable -> WriteInThread -> CommitOffsets

decode each message into its table's rows; gather one INSERT batch per table (of its own
size and age: `batch_rows`, `batch_seconds`, about one INSERT per second per table under
load); record the batch's offset ranges in `sink_intents` and INSERT it under a token made
of them, in the INSERT thread (the next batch is decoded meanwhile); commit the offsets
it carries. Offsets are committed only after the INSERT holding their rows returned. While
ClickHouse fails, the batch is retried with backoff under the same token and fetching is
paused (backpressure); nothing is dropped.

Exactly once in the tables, roll-ups included. A successor (after a crash between
INSERT and commit, a kill in the middle of an INSERT, or a rebalance) reads the intents
beyond the committed offsets, rebuilds those exact batches from Kafka and writes them
again under the same tokens (steps/rebuild.py): every table and roll-up that already
holds a block skips it, the others get it; the raw tables are also keyed by event id
(ReplacingMergeTree) for events produced twice upstream. This holds because:
- a token is a function of the batch's offsets only, recorded before its first INSERT;
- a rebuilt batch holds exactly the rows of those offsets (the decoder is deterministic);
- ClickHouse skips a block whose token the table (raw: `insert_deduplication_token`;
  roll-ups: the token extended by the view and block number, with
  `deduplicate_blocks_in_dependent_materialized_views`) saw within its last 1,000 blocks
  (`non_replicated_deduplication_window`, kept on disk), far more than can be in flight;
- every writer names the roll-up views the same way in those ids: the store is reopened
  after migrating (`migrate.open_migrated`; the process that creates a view names it
  otherwise, which counted a rebuilt batch twice in every roll-up: issue 16);
- no offset is committed ahead of a recorded batch still being rebuilt (steps/batch.py).

Each event id once in the roll-ups, also when a producer sent the event again at a new
offset (an ingest client's retry, an SDK resend, the proxy's spool replay): the raw table
replaces such copies by key, but its views count every row inserted. So a batch of a table
with roll-ups (`llm_calls`) writes the first copy of each id in the batch, and none of the
ids the table already holds or a recorded batch being rebuilt holds (steps/dedup.py: one
lookup per batch, the table's ids within the batch's seconds). This holds because the batches of
a partition are written one after the other by its one owner, each INSERT after the
previous returned, so each lookup sees every earlier copy of that partition; and because
the choice is recorded with the batch's intent before its INSERT (`skipped_ids`, migration
8) and a rebuild repeats it from the record, never from a new lookup (its own rows may
be in the table already), so the same token always carries the same rows.
Its limit: a copy keyed to another partition than its original. Producers key calls by
model, so a copy lands on its original's partition; one keyed otherwise (a producer that
changed its key) can reach a partition that another sink owns, and when both sinks look up
before either INSERT has landed, both write it: `llm_calls` holds it once (FINAL), the
roll-ups count it twice. One sink alone (the embedded store's only mode) writes all
partitions one batch at a time and sees every earlier copy, except in one window: after a
crash between recording a batch and its INSERT, a copy on another partition written before
the recorded batch's messages are read again (its ids are not known yet) is written twice.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from llmpulse.config import Settings
from llmpulse.kafka.clients import consumer_settings
from llmpulse.sinks.clickhouse.rollup_audit import RollupAudit
from llmpulse.sinks.clickhouse.rows import TABLES
from llmpulse.sinks.clickhouse.steps.batch import BatchByTable, Buffer
from llmpulse.sinks.clickhouse.steps.commit import CommitOffsets
from llmpulse.sinks.clickhouse.steps.decode import Decode
from llmpulse.sinks.clickhouse.steps.rebuild import plan_rebuilds
from llmpulse.sinks.clickhouse.steps.write import WriteInThread
from llmpulse.sinks.clickhouse.writer import BatchWriter

log = logging.getLogger(__name__)

PLAN_WAIT_S = 120.0
"""How long an assignment waits for the recorded batches while the store is unreachable (well
under librdkafka's max.poll.interval.ms, 300 s, which would take the partitions away)."""

FETCH = {"max.partition.fetch.bytes": 16 << 20}
"""The sink reads large batch envelopes (~200 KB per 500 calls): librdkafka's default of 1 MiB per
partition and fetch brings a few thousand events per round trip, which capped the sink below
100,000 rows/s; 16 MiB lets one fetch carry a whole INSERT batch."""


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
        self.stopping = threading.Event()
        self.paused = False
        self._in_callback = False
        # the steps, last first: each hands its finished work to the next
        self.commit = CommitOffsets(self.consumer)
        # a cluster's Replicated tables commit a block's id with its part: no roll-up block to lose
        audit = None if settings.clickhouse.cluster else RollupAudit(client, settings.clickhouse)
        self.write = WriteInThread(
            self.writer, self.commit, self.cfg.retry_initial_s, self.cfg.retry_max_s, self._stall, self._resume, audit
        )
        self.batch = BatchByTable(self.topic_table, self.cfg.batch_rows, self.cfg.batch_seconds, self.write)
        self.decode = Decode(self.topic_table, self.batch)

    @property
    def buffers(self) -> dict[str, Buffer]:
        return self.batch.buffers

    @property
    def buffered(self) -> int:
        return self.batch.buffered

    @property
    def rebuilding(self) -> bool:
        return bool(self.batch.rebuilding)

    @property
    def replayed_batches(self) -> int:
        return self.commit.rebuilt_batches

    @property
    def skipped_invalid(self) -> int:
        return self.decode.skipped_invalid

    # -- Kafka callbacks (served from consumer.poll) ---------------------------------------------
    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        # write and commit what we hold before the partitions move, so the next owner starts
        # after it; batches still being rebuilt stay recorded: the next owner rebuilds them
        self._in_callback = True
        try:
            self.join()
        finally:
            self._in_callback = False
        self.batch.forget()

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        """Plan the rebuilds of the recorded batches past the committed offsets, before anything
        of these partitions is written.

        Without the plan a recorded batch is not rebuilt under its token: its events come back
        in new batches, and the id lookup (steps/dedup.py) leaves out those the raw table got
        while a roll-up missed them, so the roll-up lacks them for good (chaos seed 25: the
        intents were unreadable during a store_down, the sink went on without them, and
        llm_calls_1m missed one event). So the plan is read until it is, while the store is
        unreachable; past `PLAN_WAIT_S` (under the group's max.poll.interval) the sink stops
        with the error, and the next one to start reads it: nothing was committed meanwhile."""
        delay = self.cfg.retry_initial_s
        deadline = time.monotonic() + PLAN_WAIT_S
        while True:
            try:
                committed = consumer.committed(partitions, timeout=30)
                positions = {(tp.topic, tp.partition): max(tp.offset, 0) for tp in committed}
                intents = self.writer.intents(sorted({t for t, _ in positions}))
                self.batch.plan(plan_rebuilds(intents, positions, self.topic_table))
                return
            except Exception as exc:
                if self.stopping.is_set() or time.monotonic() + delay > deadline:
                    raise RuntimeError(f"could not read the recorded batches for {PLAN_WAIT_S:.0f} s: {exc}") from exc
                log.warning("could not read the recorded batches (%s); retrying in %.1f s", exc, delay)
                time.sleep(delay)
                delay = min(self.cfg.retry_max_s, delay * 2)

    def start(self) -> None:
        self.consumer.subscribe(list(self.topic_table), on_assign=self._on_assign, on_revoke=self._on_revoke)

    # -- backpressure (called by the write step while an INSERT fails) ------------------------------
    def _stall(self) -> None:
        """Stop fetching while ClickHouse fails, keep the group membership."""
        if self._in_callback:
            time.sleep(0.1)  # inside a rebalance callback: the consumer is not ours to poll
            return
        if not self.paused:
            try:
                self.consumer.pause(self.consumer.assignment())
                self.paused = True
            except Exception:
                time.sleep(0.1)
                return
        msg = self.consumer.poll(0.1)  # serves heartbeats and rebalance callbacks; paused: no messages
        if msg is not None and msg.error() is None:
            # a partition assigned during this poll is not paused: never drop what it returned,
            # read it again once the INSERT is through
            from confluent_kafka import TopicPartition

            self.consumer.seek(TopicPartition(str(msg.topic()), int(msg.partition() or 0), int(msg.offset() or 0)))
            self.paused = False

    def _resume(self) -> None:
        if self.paused:
            with contextlib.suppress(Exception):
                self.consumer.resume(self.consumer.assignment())
            self.paused = False

    # -- the loop -----------------------------------------------------------------------------------
    def poll_once(self, timeout: float = 0.2) -> int:
        # what is already fetched, at once; wait (up to `timeout`) only when nothing is: consume(n, t)
        # alone waits the whole `t` unless n messages arrive, 200 ms of every poll at high rates
        msgs = self.consumer.consume(self.cfg.poll_messages, 0)
        if not msgs:
            first = self.consumer.poll(timeout)
            msgs = [] if first is None else [first, *self.consumer.consume(self.cfg.poll_messages - 1, 0)]
        n = 0
        submit = self.decode.submit
        for msg in msgs:
            if msg.error() is not None:
                continue
            submit(msg)
            n += 1
        self.decode.poll()
        if self.batch.buffered >= self.cfg.max_buffered_rows:
            self.batch.flush()  # backpressure: nothing more is fetched until the buffers are written
        return n

    def join(self) -> None:
        """Write every buffer and wait until all is written and committed."""
        self.decode.join()

    def run(self, drain_quiet_s: float = 1.0) -> None:
        """Consume until stopped; on stop, keep draining until the topics are quiet, then write all."""
        self.start()
        while not self.stopping.is_set():
            self.poll_once()
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < drain_quiet_s:
            if self.poll_once(0.2):
                quiet_since = time.monotonic()
        self.join()
        self.consumer.close()
        self.write.close()

    def stop(self) -> None:
        """First call: drain, write and commit, then stop. A second call while ClickHouse is
        still failing gives the batch in flight up (rebuilt from its intent by the next sink)."""
        if self.stopping.is_set():
            self.write.terminate()
        self.stopping.set()
