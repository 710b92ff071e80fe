"""What flows between the sink's steps: an INSERT batch and the offsets its write releases."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmpulse.sinks.clickhouse.rows import TableSpec

TopicPart = tuple[str, int]


@dataclass
class Batch:
    """One INSERT into one table.

    `token` names the batch by its Kafka offsets (`ranges`: partition -> first, last) and is
    its deduplication token. `commit` (partition -> next offset) is what may be committed
    once this batch and every batch submitted before it are written: it leaves out the
    partitions whose recorded batches are still being rebuilt. A `rebuilt` batch was
    recorded by an earlier sink (not recorded again); `only_missing` marks a part of one
    that nobody can rebuild whole: only the events the table lacks are written.

    A table with roll-ups (`spec.rolled_up`) gets each event id once (steps/dedup.py):
    `skipped` holds the ids left out because the table (or a recorded batch still being
    rebuilt) has them; chosen once, in the INSERT thread, and recorded in the batch's
    intent before its INSERT; a rebuilt batch carries the recorded set (None: recorded
    without deduplication, written as it is). `pending` are the ids that recorded batches
    still being rebuilt hold when this one is handed over: they will write them.
    `rows` is what the INSERT writes, fixed at the first attempt, so a retry writes the
    same rows under the same token.
    """

    topic: str
    spec: TableSpec
    items: list[Any]
    token: str
    ranges: dict[int, tuple[int, int]]
    commit: dict[int, int] = field(default_factory=dict)
    rebuilt: bool = False
    only_missing: bool = False
    skipped: frozenset[str] | None = None
    pending: frozenset[str] = frozenset()
    rows: list[Any] | None = None
