"""Source offsets committed only after the state that covers them is on the changelog.

Each processed batch leaves the offsets it consumed (per partition: the next offset to
read) and the delivery futures of the state records written for it. Entries become
committable in the order they were added, and only once all their futures and those of
every entry before them have completed: so a committed offset never runs ahead of the
state a restarted or rebalanced worker restores. (Commits lagging the state are
harmless: the state's applied offset skips a replay.) A failed delivery is raised, not
skipped: the offsets after it must not be committed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Hashable, Iterable, Mapping
from typing import Any


class CommitLedger:
    def __init__(self) -> None:
        self.entries: list[tuple[list[Any], dict[Hashable, int]]] = []

    def add(self, futures: Iterable[Awaitable[Any]], offsets: Mapping[Any, int]) -> None:
        """A batch's state deliveries and the offsets (next to read) they cover."""
        self.entries.append((list(futures), dict(offsets)))

    def committable(self) -> dict[Hashable, int]:
        """Offsets whose state is delivered, merged over the delivered prefix; taken out of the ledger."""
        out: dict[Hashable, int] = {}
        done = 0
        for futures, offsets in self.entries:
            if not all(f.done() for f in futures):
                break
            for f in futures:
                exc = f.exception()
                if exc is not None:
                    raise exc
            for key, offset in offsets.items():
                if offset > out.get(key, -1):
                    out[key] = offset
            done += 1
        del self.entries[:done]
        return out

    def forget(self, keys: Iterable[Hashable]) -> None:
        """Drop the offsets of revoked partitions (their next owner commits them)."""
        gone = set(keys)
        for _, offsets in self.entries:
            for key in gone & offsets.keys():
                del offsets[key]
