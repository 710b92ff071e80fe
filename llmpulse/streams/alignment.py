"""Event-time alignment of the source partitions one worker reads.

Guarantee: while a partition of a kind has a backlog, this worker hands stage 1 no record
of another partition of that kind whose event time is more than `max_skew_ms` ahead of it
(a partition held this way keeps its records buffered in the consumer; nothing is skipped,
dropped or fetched twice, and no window changes: each partition's windows depend on its own
events only). Partitions at their end, and partitions that have not applied an event yet,
hold no other back.

The failure it defends against: on a backlog (a replay, a backfill after an outage, a
worker restarted behind) aiokafka's `getmany` drains its buffered records partition after
partition, up to `max_records`, so the partitions of a topic drift apart in event time: on
`bench/run.py replay --days 1` the GPU partition reached the end of the day in the first
seconds and calls partition 0 finished while partition 1 was 19 hours behind. A window is
final only when every source partition's close mark has passed it (finalizing.py), so the
finalizer held every window between the slowest and the fastest partition: up to 5,538
pending windows in one finalizer, nothing published for most of the run, then everything
in a burst at the end; the memory grew with the length of the backlog (3 days: 706 MB).
Flink's watermark alignment (FLIP-182) bounds the same drift the same way.

Alignment is per worker: the partitions other workers own are not seen (the finalizer
still waits for them), and it only throttles; a held partition's backlog keeps it from
being closed as idle (window_stage.py `_has_backlog`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

TopicPart = tuple[str, int]


class PartitionTime(NamedTuple):
    kind: str  # partitions of one kind are aligned with each other (a finalizer waits per kind)
    event_ms: int | None  # the latest event time the partition applied (None: none yet)
    backlog: bool  # the broker holds messages of it past what it applied


def held_partitions(partitions: Mapping[TopicPart, PartitionTime], max_skew_ms: int) -> set[TopicPart]:
    """The partitions not to read now: those with a backlog more than `max_skew_ms` of event
    time ahead of the slowest partition of their kind that has a backlog. The slowest is never
    held, so some partition always advances while any has a backlog."""
    floor: dict[str, int] = {}
    for p in partitions.values():
        if p.backlog and p.event_ms is not None and (p.kind not in floor or p.event_ms < floor[p.kind]):
            floor[p.kind] = p.event_ms
    return {
        tp
        for tp, p in partitions.items()
        # one at its end is not held: it has nothing buffered, and new records reaching it are
        # live traffic, which must not wait for a backlog of another partition
        if p.backlog and p.event_ms is not None and p.event_ms > floor[p.kind] + max_skew_ms
    }
