"""Step 2 of the sink: one INSERT batch per table, and recorded batches rebuilt exactly.

Contract:
- submit(topic, partition, offset, timestamp, rows): a message's rows go to the recorded
  batch being rebuilt that covers this offset, else to its table's buffer. A buffer that
  reaches `batch_rows` is handed to the write step at once. Blocks only while the write
  step is still writing the previous batch.
- poll(): hands over buffers whose oldest row is `batch_seconds` old; then polls the
  write step. Blocks as submit does.
- flush(): hands over every non-empty buffer (largest first).
- join(): flush(), then the write step's join: on return everything submitted so far is
  written and its offsets committed (except partitions still being rebuilt).
- Each batch carries the offsets to commit after it (`Batch.commit`): per partition, the
  end of everything handed over so far. Batches are written in the order handed over,
  so once this one is written all earlier ones are too. A partition with a recorded
  batch still being rebuilt is left out until that rebuilt batch is handed over: its
  offsets are never committed ahead of it, even when later rows were written first.
- A batch of a table with roll-ups handed over while recorded batches of it are still
  being rebuilt carries the ids they hold so far (`Batch.pending`): it leaves them out,
  they write them (steps/dedup.py).
- A buffer holds each partition's offsets contiguously: a rebuilt batch's first message
  on a partition the buffer already holds flushes the buffer first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmpulse.sinks.clickhouse.rows import TableSpec
from llmpulse.sinks.clickhouse.steps.model import Batch, TopicPart
from llmpulse.sinks.clickhouse.steps.rebuild import Rebuild
from llmpulse.sinks.clickhouse.steps.write import WriteInThread


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


class BatchByTable:
    def __init__(
        self,
        tables: dict[str, TableSpec],
        batch_rows: int,
        batch_seconds: float,
        next_step: WriteInThread,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.buffers = {topic: Buffer(topic, spec) for topic, spec in tables.items()}
        self.batch_rows = batch_rows
        self.batch_seconds = batch_seconds
        self.next = next_step
        self.clock = clock
        self.rebuilding: dict[TopicPart, list[Rebuild]] = {}
        self._handed: dict[TopicPart, int] = {}  # last offset handed to the write step, per partition

    @property
    def buffered(self) -> int:
        return sum(len(b.items) for b in self.buffers.values())

    def plan(self, rebuilds: list[Rebuild]) -> None:
        """Partitions were assigned: these recorded batches are rebuilt before anything past them commits."""
        self.rebuilding.clear()
        self._handed.clear()
        for r in rebuilds:
            for p in r.ranges:
                self.rebuilding.setdefault((r.topic, p), []).append(r)

    def forget(self) -> None:
        """Partitions were revoked (after join): their unfinished rebuilds are the next owner's."""
        self.rebuilding.clear()
        self._handed.clear()

    def submit(self, topic: str, part: int, off: int, ts: int, items: list[Any]) -> None:
        buf = self.buffers[topic]
        key = (topic, part)
        if key in self.rebuilding:
            rebuilds = self.rebuilding[key]
            if part in buf.ranges and any(r.covers(part, off) for r in rebuilds):
                self._hand_over(buf)  # keep each batch's offsets contiguous
            taken = False
            for r in list(rebuilds):
                taken = r.take(part, off, items) or taken
                if r.complete:
                    self._hand_over_rebuilt(r)
            if taken:
                return
        rng = buf.ranges.get(part)
        if rng is None:
            buf.ranges[part] = [off, off]
        else:
            rng[1] = off
        if buf.oldest is None:
            buf.oldest = self.clock()
            buf.first_ts = ts
        buf.items.extend(items)
        if len(buf.items) >= self.batch_rows:
            self._hand_over(buf)

    def poll(self) -> None:
        now = self.clock()
        for buf in self.buffers.values():
            if buf.oldest is not None and now - buf.oldest >= self.batch_seconds:
                self._hand_over(buf)
        self.next.poll()

    def flush(self) -> None:
        for buf in sorted(self.buffers.values(), key=lambda b: -len(b.items)):
            self._hand_over(buf)

    def join(self) -> None:
        self.flush()
        self.next.join()

    def _commit_after(self, topic: str, parts: Any) -> dict[int, int]:
        return {p: self._handed[(topic, p)] + 1 for p in parts if (topic, p) not in self.rebuilding}

    def _hand_over(self, buf: Buffer) -> None:
        # wait for the write in flight first: the buffer is taken as it is after that wait
        self.next.wait_idle()
        if buf.oldest is None:
            return
        ranges = {p: (a, b) for p, (a, b) in buf.ranges.items()}
        batch = Batch(buf.topic, buf.spec, buf.items, buf.token(), ranges, pending=self._pending_ids(buf))
        buf.clear()
        for p, (_, last) in ranges.items():
            key = (batch.topic, p)
            self._handed[key] = max(self._handed.get(key, -1), last)
        batch.commit = self._commit_after(batch.topic, ranges)
        self.next.submit(batch)

    def _pending_ids(self, buf: Buffer) -> frozenset[str]:
        """The ids that recorded batches of this table still being rebuilt hold so far: they
        write them (their rows are fixed), so a batch written before them leaves them out."""
        if not buf.spec.rolled_up or not self.rebuilding:
            return frozenset()
        col = buf.spec.id_column
        rebuilds = {id(r): r for (topic, _), rs in self.rebuilding.items() if topic == buf.topic for r in rs}
        return frozenset(str(getattr(e, col)) for r in rebuilds.values() for e in r.items)

    def _hand_over_rebuilt(self, r: Rebuild) -> None:
        for p, (_, last) in r.ranges.items():
            key = (r.topic, p)
            self._handed[key] = max(self._handed.get(key, -1), last)
            rs = self.rebuilding.get(key, [])
            if r in rs:
                rs.remove(r)
            if not rs:
                self.rebuilding.pop(key, None)
        batch = Batch(r.topic, r.spec, r.items, r.token, dict(r.ranges), rebuilt=True, only_missing=r.only_missing,
                      skipped=r.skipped)  # fmt: skip
        batch.commit = self._commit_after(r.topic, r.ranges)
        self.next.wait_idle()
        self.next.submit(batch)
