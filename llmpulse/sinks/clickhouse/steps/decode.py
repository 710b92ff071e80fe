"""Step 1 of the sink: decode. A Kafka message becomes the rows of its topic's table.

Contract:
- submit(msg): decodes the value (msgspec, pydantic for what it refuses) and hands the
  rows with the message's coordinates to the batch step. Blocks only when the batch
  step does (a full batch waiting for the INSERT thread). Invalid events are counted and
  skipped: the worker dead-letters them with their reason.
- poll(), join(): passed on; this step holds nothing.
- Commits nothing: a decoded message counts for nothing until its batch is written.
"""

from __future__ import annotations

from typing import Any

from llmpulse import metrics
from llmpulse.sinks.clickhouse.rows import TableSpec
from llmpulse.sinks.clickhouse.steps.batch import BatchByTable


class Decode:
    def __init__(self, tables: dict[str, TableSpec], next_step: BatchByTable) -> None:
        self.tables = tables
        self.next = next_step
        self.skipped_invalid = 0

    def submit(self, msg: Any) -> None:
        topic = msg.topic()
        spec = self.tables[topic]
        items, invalid = spec.items(msg.value())
        self.skipped_invalid += invalid
        metrics.EVENTS_IN.labels("sink", spec.table).inc(len(items))
        self.next.submit(topic, msg.partition(), msg.offset(), msg.timestamp()[1], items)

    def poll(self) -> None:
        self.next.poll()

    def join(self) -> None:
        self.next.join()
