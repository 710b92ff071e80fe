"""Step 4 of the sink: commit the offsets of written batches.

Contract:
- submit(batch): called by the write step only once the batch (and every batch before
  it) is written. Commits `batch.commit` synchronously (waits for the broker's answer),
  for the partitions this consumer still owns: a partition given away meanwhile is its
  new owner's to commit.
- A failed commit is logged and not retried: the offsets stay behind, and the next owner
  rebuilds the batch from its recorded intent under the same token (skipped where it
  landed). The next successful commit covers it.
- poll(), join(): nothing is held here.
"""

from __future__ import annotations

import logging
from typing import Any

from llmpulse.sinks.clickhouse.steps.model import Batch

log = logging.getLogger(__name__)


class CommitOffsets:
    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.written_batches = 0
        self.rebuilt_batches = 0

    def submit(self, batch: Batch) -> None:
        self.written_batches += 1
        self.rebuilt_batches += int(batch.rebuilt)
        if not batch.commit:
            return
        from confluent_kafka import TopicPartition

        try:
            mine = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        except Exception:
            return  # closed: nothing is ours any more
        tps = [TopicPartition(batch.topic, p, off) for p, off in sorted(batch.commit.items()) if (batch.topic, p) in mine]
        if not tps:
            return
        try:
            self.consumer.commit(offsets=tps, asynchronous=False)
        except Exception as exc:
            log.warning("offset commit failed (%s); the batch will be rebuilt and skipped by its token", exc)

    def poll(self) -> None:
        pass

    def join(self) -> None:
        pass
