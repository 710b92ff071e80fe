"""Every offset of a partition processed once and in order, whatever the consumer delivers.

The worker's state records, per partition, the last offset it applied. Faust's consumer
does not always deliver a partition's offsets contiguously: around rebalances it was
seen to re-deliver a message, to go back after a seek, and to jump forward, skipping
messages (its read offset moved past them and it dropped them as already read, while
marking the skipped range as a gap it may commit). Going back is harmless: the state
skips what it already applied. Going forward would lose those events silently.

So before a batch is applied, its offsets are checked against the state: the first
offset after the last applied one must follow it. At a gap the batch is cut there, the
consumer is sent back to the missing offset, and messages after the gap are dropped
until the missing one arrives. A gap that is real (offsets that hold no message, such
as transaction markers, or records deleted by retention) persists over several seeks;
it is then accepted, with a warning naming the range.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from llmpulse import metrics

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Rewind:
    """A partition sent back to `expected`; what arrived after the gap since then."""

    expected: int
    started: float
    last_seek: float
    seeks: int = 1
    lowest_after: int | None = None


@dataclass(slots=True)
class Admission:
    take: int  # how many of the batch's messages to apply, from the start
    seek_to: int | None = None  # send the consumer back here


class OffsetGuard:
    def __init__(
        self, reseek_s: float = 2.0, accept_after_s: float = 10.0, accept_after_seeks: int = 3
    ) -> None:
        self.reseek_s = reseek_s
        self.accept_after_s = accept_after_s
        self.accept_after_seeks = accept_after_seeks
        self.rewinds: dict[Hashable, Rewind] = {}
        self.gaps_seen = 0  # gaps found (each one sent the consumer back)
        self.gaps_accepted = 0  # gaps that held no messages

    def due_reseeks(self, now: float) -> list[tuple[Hashable, int]]:
        """Rewinds whose seek has not brought the missing offset back yet: seek them again.

        Called by a timer, so that a partition that receives nothing more (the end of the
        traffic) is still sent back: a seek can be undone by a fetch that was in flight
        when it happened (its later messages move the consumer's read offset past the
        missing ones again)."""
        due = []
        for key, rewind in self.rewinds.items():
            if now - rewind.last_seek >= self.reseek_s:
                rewind.seeks += 1
                rewind.last_seek = now
                rewind.lowest_after = None
                due.append((key, rewind.expected))
        return due

    def forget(self, key: Hashable) -> None:
        self.rewinds.pop(key, None)

    def admit(
        self, key: Hashable, applied: int | None, offsets: Sequence[int], now: float
    ) -> Admission:
        """The prefix of `offsets` (in delivery order) that continues from `applied` without a gap.

        `applied`: the last offset the state holds (None: no state yet, anything starts it)."""
        if applied is None:
            self.rewinds.pop(key, None)
            return Admission(len(offsets))
        high = applied
        rewind = self.rewinds.get(key)
        for i, offset in enumerate(offsets):
            if offset <= high:
                continue  # re-delivered: the state skips it
            if offset == high + 1:
                high = offset
                if rewind is not None:
                    self.rewinds.pop(key, None)
                    rewind = None
                continue
            # a gap: high + 1 .. offset - 1 did not arrive
            missing = high + 1
            if rewind is None or rewind.expected != missing:
                self.gaps_seen += 1
                log.warning(
                    "partition %s: offsets %d..%d were skipped by the consumer; going back to %d",
                    key, missing, offset - 1, missing,
                )  # fmt: skip
                self.rewinds[key] = Rewind(missing, now, now, lowest_after=offset)
                return Admission(i, seek_to=missing)
            if rewind.lowest_after is None or offset < rewind.lowest_after:
                rewind.lowest_after = offset
            if (
                rewind.seeks >= self.accept_after_seeks
                and now - rewind.started >= self.accept_after_s
                and offset == rewind.lowest_after
            ):
                self.gaps_accepted += 1
                log.warning(
                    "partition %s: offsets %d..%d hold no messages (transaction markers or deleted "
                    "records); continuing from %d", key, missing, offset - 1, offset,
                )  # fmt: skip
                self.rewinds.pop(key, None)
                rewind = None
                high = offset
                continue
            if now - rewind.last_seek >= self.reseek_s:
                rewind.seeks += 1
                rewind.last_seek = now
                rewind.lowest_after = offset
                return Admission(i, seek_to=missing)
            return Admission(i)  # still waiting for the seek to take effect
        return Admission(len(offsets))


# (topic, partition, offset) -> None: send the partition's consumer back to an offset
Seek = Callable[[str, int, int], Awaitable[None]]


async def admit_messages(
    guard: OffsetGuard, key: Hashable, applied: int | None, msgs: Sequence[Any], seek: Seek
) -> list[Any]:
    """The messages of a batch to apply: new ones, continuing the state's `applied` offset
    without a gap (a gap cuts the batch and seeks the partition back; counted in
    llmpulse_offset_gaps_total)."""
    accepted = guard.gaps_accepted
    adm = guard.admit(key, applied, [m.offset for m in msgs], time.monotonic())
    if guard.gaps_accepted > accepted:
        metrics.OFFSET_GAPS.labels(msgs[0].topic, "accepted").inc()
    if adm.seek_to is not None:
        metrics.OFFSET_GAPS.labels(msgs[0].topic, "rewound").inc()
        await seek(msgs[0].topic, msgs[0].partition, adm.seek_to)
    taken = msgs[: adm.take]
    return list(taken) if applied is None else [m for m in taken if m.offset > applied]
