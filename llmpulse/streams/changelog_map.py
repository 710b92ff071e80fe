"""Stage 2's state table: its values in memory, every change a record of its changelog,
published in bulk.

Why not a Faust table (what stage 2 used before): each write to a Faust table is one
message through Faust's producer buffer, a queue drained one record at a time by a task
(a queue get, a send, a future and a wake-up each), and Faust's commit waits for that
buffer to drain one message at a time (a `wait_for` task per message). On sparse traffic
stage 2 writes about one record per window and dimension-set batch, and that per-record
machinery cost more of the worker's event loop than the writes themselves (issue 15).
Here a batch's records go out as one record batch per partition (bulk_publish.py).

Keys are text `"<partition>|..."` (state_keys.py): a key lives in the changelog partition
it names, the partials partition whose state it is, so whoever is assigned that partials
partition reads it back (restore.py). Records are JSON keys and values, tombstones for
deletions: the format the Faust table wrote, so a state written before this change
restores unchanged, from the same topic.

Contract (the order is what makes a crash harmless):
- `table[key] = value`, `del table[key]`: change the value at once and queue the record,
  its text made now (what was set, even if the value is mutated later), in call order.
  Nothing blocks.
- `load(partition, values)`: a partition read back from its changelog, in place of what
  the table held of it; nothing is queued (it is already on the changelog).
- `flush(publish)`: hand every queued record to `publish` in one call, in the order they
  were made (bulk_publish.py keeps a partition's records in that order), and return the
  delivery futures. A crash therefore leaves a prefix of the changes on the changelog.
- Stage 2 awaits those futures before its batch's offsets may be committed
  (finalize_stage.py): the state on the changelog covers the committed offsets.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterator, Mapping, MutableMapping
from typing import Any

from llmpulse.streams.changelog_state import KEY_TEXT, Publish, record_value


class ChangelogMap(MutableMapping[str, Any]):
    """A table whose every change queues a changelog record (see the module docstring)."""

    def __init__(self, topic: str, values: Mapping[str, Any] | None = None) -> None:
        self.topic = topic
        self.data: dict[str, Any] = dict(values or {})
        self.queued: list[tuple[int | None, bytes | None, bytes | None]] = []

    @staticmethod
    def partition_of(key: str) -> int:
        return int(key.split("|", 1)[0])

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:  # the dict's, not Mapping's (a lookup per judged set)
        return self.data.get(key, default)

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.queued.append((self.partition_of(key), KEY_TEXT(key).encode(), record_value(value)))

    def __delitem__(self, key: str) -> None:
        del self.data[key]
        self.queued.append((self.partition_of(key), KEY_TEXT(key).encode(), None))

    def __contains__(self, key: object) -> bool:
        return key in self.data

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def load(self, partition: int, values: Mapping[str, Any]) -> None:
        """A partition read back from its changelog, in place of what the table held of it."""
        prefix = f"{partition}|"
        for k in [k for k in self.data if k.startswith(prefix)]:
            del self.data[k]
        self.data.update(values)

    async def flush(self, publish: Publish) -> list[Awaitable[Any]]:
        """Publish the queued records in order; their delivery futures."""
        queued, self.queued = self.queued, []
        return await publish(self.topic, queued) if queued else []
