"""The `ts` the ingest gave an event that came with its own `event_id` but no `ts`.

Guarantee: a client that retries such an event (after a 503, a timeout, a lost
response) gets the same `ts` for it again, as long as the retry reaches this ingest
process within `horizon_s` and at most `max_ids` other such events came in between.

The failure it defends against: every copy of a retried event would otherwise be
stamped with the time it arrived. `llm_calls` is keyed by `(..., ts, event_id)` and the
worker recognises a copy by its `event_id` inside the window of its `ts`, so copies with
different stamps were stored and counted twice (seen in the chaos bench: every retried
ingest batch without `ts`). A client that sends `ts` itself, or retries through another
ingest replica, does not depend on this memory (docs/deployment.md).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime


class RetryStamps:
    """event_id -> the ts first given to it; bounded by count and by age (oldest first)."""

    def __init__(
        self,
        horizon_s: float = 900.0,
        max_ids: int = 200_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._horizon_s = horizon_s
        self._max_ids = max_ids
        self._clock = clock
        # Insertion order is arrival order, so eviction pops from the front only.
        self._stamps: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._stamps)

    def stamp(self, event_id: str) -> datetime:
        """The ts of `event_id`: the one it got on its first arrival, else now."""
        now = self._clock()
        self._evict(now)
        first = self._stamps.get(event_id)
        if first is None:
            first = now
            self._stamps[event_id] = now
            if len(self._stamps) > self._max_ids:
                self._stamps.popitem(last=False)
        return datetime.fromtimestamp(first, UTC)

    def _evict(self, now: float) -> None:
        oldest = now - self._horizon_s
        while self._stamps:
            eid, first = next(iter(self._stamps.items()))
            if first >= oldest:
                break
            del self._stamps[eid]
