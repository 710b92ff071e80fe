"""Recorded batches to rebuild: which, and their assembly from re-delivered messages.

A sink records each batch (its offset ranges and token) in `sink_intents` before the
INSERT. A successor that finds a recorded batch beyond the committed offsets cannot know
whether its INSERT landed (wholly, partly: some roll-ups only, or not at all). It
rebuilds the batch from exactly those offsets and writes it under the same token: every
table and roll-up that already holds the block skips it, the others get it. Rebuilding
the same rows under a different token would count them twice in the roll-ups; so would
other rows under the same token: a batch of a table with roll-ups leaves out the ids
recorded with it and later copies in the batch, exactly as it first did (dedup.py).

When a rebalance (or a partial commit) leaves only part of a recorded batch here,
nobody can rebuild it whole: this sink rebuilds its own part, and for a table with
roll-ups writes only the events the table lacks (`only_missing`). A table without
roll-ups needs nothing special: its re-delivered rows replace their twins by key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from llmpulse.sinks.clickhouse.rows import TableSpec
from llmpulse.sinks.clickhouse.steps.model import TopicPart

log = logging.getLogger(__name__)


class Intent(NamedTuple):
    """A batch as recorded in sink_intents."""

    topic: str
    token: str
    ranges: list[tuple[int, int, int]]  # (partition, first, last)
    skipped: frozenset[str] | None = None  # ids its INSERT left out (None: written whole, see dedup.py)


@dataclass
class Rebuild:
    """A recorded batch being assembled again from the same offsets."""

    topic: str
    spec: TableSpec
    token: str
    ranges: dict[int, tuple[int, int]]
    only_missing: bool = False
    skipped: frozenset[str] | None = None  # as recorded: the rebuilt INSERT leaves out the same ids
    done: set[int] = field(default_factory=set)
    items: list[Any] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return len(self.done) == len(self.ranges)

    def covers(self, part: int, off: int) -> bool:
        first, last = self.ranges[part]
        return first <= off <= last and part not in self.done

    def take(self, part: int, off: int, items: list[Any]) -> bool:
        """True if the message at (part, off) belongs here (its rows were taken)."""
        first, last = self.ranges[part]
        if part in self.done:
            return False
        if off > last:
            self.done.add(part)  # a compacted topic may lack the last offset
            return False
        if off < first:
            return False
        self.items.extend(items)
        if off == last:
            self.done.add(part)
        return True


def plan_rebuilds(intents: list[Intent], positions: dict[TopicPart, int], tables: dict[str, TableSpec]) -> list[Rebuild]:
    """The recorded batches (newest first in `intents`) that this sink, owning the partitions
    in `positions` (partition -> committed offset), must rebuild; oldest first."""
    out: list[Rebuild] = []
    for topic, token, ranges, skipped in reversed(intents):
        spec = tables.get(topic)
        if spec is None or not ranges:
            continue
        if all(last < positions.get((topic, p), 0) for p, _, last in ranges):
            continue  # written and committed
        if any((topic, p) not in positions or first < positions[(topic, p)] for p, first, _ in ranges):
            own = {
                p: (max(first, positions[(topic, p)]), last)
                for p, first, last in ranges
                if (topic, p) in positions and last >= positions[(topic, p)]
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
            out.append(Rebuild(topic, spec, token, own, only_missing=True, skipped=skipped))
        else:
            out.append(Rebuild(topic, spec, token, {p: (a, b) for p, a, b in ranges}, skipped=skipped))
    if out:
        log.warning("rebuilding %d recorded batch(es) from Kafka (a previous sink stopped before committing)", len(out))
    return out
