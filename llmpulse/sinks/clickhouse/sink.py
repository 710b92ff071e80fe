"""The sink consumer: Kafka topics -> ClickHouse tables, at least once, never twice.

In the manner of arroyo and snuba: messages are decoded into per-table row buffers
(the processing step); buffers are written in INSERT batches of their own size and
age (about one INSERT per second per table under load); offsets are committed only
after every INSERT holding their rows has returned. When ClickHouse fails, the batch
is kept and retried with backoff while consumption is paused (backpressure), so
nothing is lost. Re-delivered rows are harmless: tables replace rows by event id.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from llmpulse import metrics
from llmpulse.config import Settings
from llmpulse.kafka.clients import consumer_settings
from llmpulse.schemas.codec import decode
from llmpulse.sinks.clickhouse.rows import TABLES, TableSpec
from llmpulse.sinks.clickhouse.writer import BatchWriter, retry_forever

log = logging.getLogger(__name__)


@dataclass
class Buffer:
    spec: TableSpec
    rows: list[list[Any]] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)


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
            )
        )
        self.buffers: dict[str, Buffer] = {t: Buffer(spec) for t, spec in self.topic_table.items()}
        self.offsets: dict[tuple[str, int], int] = {}
        self.buffered = 0
        self.oldest: float | None = None
        self.stopping = threading.Event()
        self.paused = False
        self.skipped_invalid = 0

    # -- Kafka callbacks ------------------------------------------------------------------------
    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        # flush what we hold before the partitions move, so the next owner starts after it
        self.flush(final=True)

    def start(self) -> None:
        self.consumer.subscribe(list(self.topic_table), on_revoke=self._on_revoke)

    # -- processing -------------------------------------------------------------------------------
    def submit(self, msg: Any) -> None:
        topic = msg.topic()
        buf = self.buffers[topic]
        decoded = decode(msg.value(), buf.spec.model)
        if decoded.rejected:
            # the worker sends invalid source events to the dead-letter topic; here they are skipped
            self.skipped_invalid += len(decoded.rejected)
        to_row = buf.spec.to_row
        for ev in decoded.valid:
            buf.rows.append(to_row(ev))
        n = len(decoded.valid)
        metrics.EVENTS_IN.labels("sink", buf.spec.table).inc(n)
        self.buffered += n
        self.offsets[(topic, msg.partition())] = msg.offset()
        if self.oldest is None:
            self.oldest = time.monotonic()

    def due(self) -> bool:
        if self.oldest is None:
            return False
        return self.buffered >= self.cfg.batch_rows or time.monotonic() - self.oldest >= self.cfg.batch_seconds

    def flush(self, final: bool = False) -> bool:
        """INSERT every buffer, then commit the offsets; False if stopped before it succeeded."""
        if self.oldest is None and not self.offsets:
            return True
        for buf in self.buffers.values():
            if not buf.rows:
                continue
            rows = buf.rows
            ok = retry_forever(
                lambda b=buf, r=rows: self.writer.insert(b.spec, r),  # type: ignore[misc]
                f"INSERT into {buf.spec.table} ({len(rows)} rows)",
                self.cfg.retry_initial_s,
                self.cfg.retry_max_s,
                should_stop=lambda: self.stopping.is_set() and not final,
                on_wait=self._wait_paused,
            )
            if not ok:
                return False
            buf.rows = []
        self._resume()
        self._commit()
        self.buffered = 0
        self.oldest = None
        return True

    def _commit(self) -> None:
        if not self.offsets:
            return
        from confluent_kafka import TopicPartition

        tps = [TopicPartition(t, p, off + 1) for (t, p), off in self.offsets.items()]
        try:
            self.consumer.commit(offsets=tps, asynchronous=False)
        except Exception as exc:
            log.warning("offset commit failed (%s); the rows will be re-delivered and replaced", exc)
        self.offsets.clear()

    def _wait_paused(self, delay: float) -> None:
        """Backpressure while ClickHouse is failing: stop fetching, keep the group membership."""
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
        msgs = self.consumer.consume(10_000, timeout)
        n = 0
        for msg in msgs:
            if msg.error() is not None:
                continue
            self.submit(msg)
            n += 1
        if self.due() or self.buffered >= self.cfg.max_buffered_rows:
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

    def stop(self) -> None:
        self.stopping.set()
