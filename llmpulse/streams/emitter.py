"""Where the worker's stages put their messages: one small interface, Kafka behind it in
the worker (worker_app.py), memory in the stages' unit tests.

The stages never talk to a Kafka client or to Faust: they hand records to an `Emitter`
and keep the delivery futures it returns, so their commit order (a close mark after its
partials, a window's meta after its accumulators, an offset after the state covering it)
can be read in the stage and tested without a broker.

Contract:
- `send(topic, key, value, partition=None)`: queue one record and return its delivery
  future at once; nothing waits for the broker. Without a partition the record goes where
  Kafka's default partitioner puts its key.
- `publish(topic, records)`: queue many records in one call (bulk_publish.py: one batch
  per partition) and return their delivery futures.
- Records of one topic partition are delivered in the order they were queued, by either
  call: what every ordering guarantee of the stages rests on. A delivery that fails
  fails its future; the caller must not treat what follows it as written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, Protocol

from llmpulse.streams.bulk_publish import Record, default_partition


class Emitter(Protocol):
    async def send(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None
    ) -> Awaitable[Any]:
        """Queue one record; its delivery future."""

    async def publish(self, topic: str, records: list[Record]) -> list[Awaitable[Any]]:
        """Queue records in bulk, each partition's in order; their delivery futures."""


class MemoryEmitter:
    """Delivers at once into lists per (topic, partition), in call order (the stages' tests).

    `partitions` is the partition count of every topic (for keyed records without one)."""

    def __init__(self, partitions: int = 1) -> None:
        self.partitions = partitions
        self.records: dict[tuple[str, int], list[tuple[bytes | None, bytes | None]]] = {}

    def _put(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int | None
    ) -> Awaitable[Any]:
        if partition is None:
            if key is None:
                raise ValueError(f"a record for {topic} without a key needs a partition")
            partition = default_partition(key, self.partitions)
        self.records.setdefault((topic, partition), []).append((key, value))
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def send(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None
    ) -> Awaitable[Any]:
        return self._put(topic, key, value, partition)

    async def publish(self, topic: str, records: list[Record]) -> list[Awaitable[Any]]:
        return [self._put(topic, key, value, partition) for partition, key, value in records]

    def values(self, topic: str, partition: int | None = None) -> list[bytes | None]:
        """The values delivered to a topic (one partition, or all in partition order)."""
        return [
            v
            for (t, p), recs in sorted(self.records.items())
            if t == topic and partition in (None, p)
            for _, v in recs
        ]
