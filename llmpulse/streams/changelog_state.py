"""Stage 1's window state: an in-memory map whose every change is a record of its changelog.

Keys are text `"<partition>|..."` (window_state.py); a key lives in the changelog
partition it names, the partition of the source partition it was computed from, so
whoever is assigned that source partition reads it back (restore.py). Records are JSON
keys and values, tombstones for deletions: the format Faust's tables wrote, so a state
written before stage 1 left Faust's tables restores unchanged.

Contract (the order is what makes a crash harmless):
- `state[key] = value`, `del state[key]`: change the map at once and queue the record,
  in call order. Nothing blocks.
- `flush(publish)`: hand every queued record to `publish` in one call, in the order
  they were made (bulk_publish.py keeps a partition's records in that order: one
  batch per partition, not one awaited send per record), and return the delivery
  futures. A crash therefore leaves a prefix of the changes on the changelog, never a
  later change without an earlier one (the meta record, written after a batch's
  accumulators and id chunks, is never on the changelog without them).
- Offsets of a batch are committed only once every future `flush` returned after it
  has completed (commits.py): the state on the changelog covers the committed offsets.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

# (topic, [(partition, key, value or None for a tombstone)] in order) -> the deliveries to wait for
Publish = Callable[[str, list[tuple[int | None, bytes | None, bytes | None]]], Awaitable[list[Awaitable[Any]]]]


class ChangelogState:
    """A dict of state records that queues a changelog record for each change."""

    def __init__(self, name: str, topic: str) -> None:
        self.name = name
        self.topic = topic
        self.data: dict[str, Any] = {}
        self.queued: list[tuple[int, str, Any]] = []  # (partition, key, value or None)

    @staticmethod
    def partition_of(key: str) -> int:
        return int(key.split("|", 1)[0])

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.queued.append((self.partition_of(key), key, value))

    def __delitem__(self, key: str) -> None:
        del self.data[key]
        self.queued.append((self.partition_of(key), key, None))

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __contains__(self, key: object) -> bool:
        return key in self.data

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(list(self.data.items()))

    def drop_partition(self, partition: int) -> None:
        """Forget a partition's keys in memory (it is restored from the changelog, or revoked)."""
        prefix = f"{partition}|"
        for k in [k for k in self.data if k.startswith(prefix)]:
            del self.data[k]

    async def flush(self, publish: Publish) -> list[Awaitable[Any]]:
        """Publish the queued records in order; their delivery futures."""
        queued, self.queued = self.queued, []
        if not queued:
            return []
        dumps = json.dumps
        records: list[tuple[int | None, bytes | None, bytes | None]] = [
            (partition, dumps(key).encode(), None if value is None else dumps(value).encode())
            for partition, key, value in queued
        ]
        return await publish(self.topic, records)
