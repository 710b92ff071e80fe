"""Publish many records at once: one record batch per partition, one delivery to wait for per batch.

Why: a closed window's aggregates (and stage 1's state records) were sent one awaited
`send` each, through Faust's topic layer and aiokafka's per-message path (a future, a
callback and a partitioner call per record): on sparse traffic, where every event closes
windows of dozens of dimension sets, that per-record cost was the largest part of the
worker's time after the rules (issue 15).

Guarantee: every record lands where, and in the order, one `send` each would have put
it. A record with an explicit partition goes there; one without goes to the partition
of Kafka's default partitioner (murmur2 of its key, as aiokafka's `send` and every Java
or librdkafka producer place it), so a topic's readers see the same keys in the same
partitions as before. Records of one partition stay in call order: they are appended to
batches in that order and the producer's queue for a partition is first in, first out,
with the records of plain `send`s before and after them.

The futures returned complete when their batch is delivered (the caller awaits them
before its state says the records were published: a crash before that publishes them
again, under the same keys).
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Sequence
from struct import unpack_from
from typing import Any, overload

import numpy as np
from numpy.typing import NDArray

Record = tuple[int | None, bytes | None, bytes | None]  # (partition or None: by key, key, value)

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (Java's `Utils.murmur2`, as unsigned 32 bits), as aiokafka's
    `partitioner.murmur2` computes it, about twice as fast: the 4-byte words are read in one
    `unpack_from`, not byte by byte (every aggregate's key is hashed once, and on sparse
    traffic there is about one aggregate per event)."""
    length = len(data)
    h = 0x9747B28C ^ length
    n4 = length >> 2
    for k in unpack_from(f"<{n4}I", data):
        k = (k * _M) & _MASK
        k = ((k ^ (k >> 24)) * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail = n4 << 2
    rest = length - tail
    if rest:
        if rest == 3:
            h ^= data[tail + 2] << 16
        if rest >= 2:
            h ^= data[tail + 1] << 8
        h = ((h ^ data[tail]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


_VECTOR_FROM = 48
"""Fewer keys than this are hashed one by one: numpy's fixed cost per call (a few dozen
array operations per 4-byte word column) is then more than the Python loop's per key."""


def murmur2_many(keys: Sequence[bytes]) -> NDArray[np.uint64]:
    """`murmur2(k)` of each key, in the keys' order, computed with numpy for many keys at once.

    Why: stage 2 publishes a replay's aggregates thousands to a call, each under its own
    key; hashing them one by one in Python was 4% of the worker's time (py-spy, a 1-day
    replay: a third of handing the aggregates to the producer). Here
    each 4-byte word column of all keys is one vector step (uint64 holds every product:
    a 32-bit value times the 31-bit multiplier): measured 6 to 15 times faster per key from
    a few hundred keys on. The keys are ordered by length, longest first, so the keys that
    still have a word j are a prefix of the rows: no mask per step. Each row is padded
    with zeros to a whole word and at least one byte past its key, so the tail's second
    and third bytes can be xored in for every key: past a key's end they are zero, and
    xoring zero is what murmur2 does for a shorter tail (nothing).
    An array, so that publish_bulk takes their partitions in one more vector step
    (`partition_of_hash`)."""
    n = len(keys)
    if n < _VECTOR_FROM:
        return np.fromiter(map(murmur2, keys), dtype=np.uint64, count=n)
    lengths = np.fromiter(map(len, keys), dtype=np.int64, count=n)
    order = np.argsort(-lengths, kind="stable")
    lengths = lengths[order]
    width = (int(lengths[0]) // 4 + 1) * 4  # every key and 1..4 zero bytes after it
    rows = b"".join([keys[i].ljust(width, b"\0") for i in order.tolist()])
    as_bytes = np.frombuffer(rows, dtype=np.uint8).reshape(n, width)
    words = np.frombuffer(rows, dtype="<u4").reshape(n, width // 4).T.astype(np.uint64)
    m, mask = np.uint64(_M), np.uint64(_MASK)
    h = np.uint64(0x9747B28C) ^ lengths.astype(np.uint64)
    n_words = lengths >> 2
    # keys with a word j: those with more than j words, a prefix of the rows (longest first)
    having = np.searchsorted(-n_words, -np.arange(width // 4), side="left")
    for j, count in enumerate(having.tolist()):
        if not count:
            break
        k = (words[j, :count] * m) & mask
        k = ((k ^ (k >> np.uint64(24))) * m) & mask
        h[:count] = ((h[:count] * m) & mask) ^ k
    tail = n_words << 2
    at = np.arange(n)
    h ^= (as_bytes[at, tail + 2].astype(np.uint64) << np.uint64(16)) | (
        as_bytes[at, tail + 1].astype(np.uint64) << np.uint64(8)
    )
    h = np.where((lengths & 3) > 0, ((h ^ as_bytes[at, tail].astype(np.uint64)) * m) & mask, h)
    h ^= h >> np.uint64(13)
    h = (h * m) & mask
    h ^= h >> np.uint64(15)
    out = np.empty(n, dtype=np.uint64)
    out[order] = h
    return out


@overload
def partition_of_hash(h: int, partitions: int) -> int: ...
@overload
def partition_of_hash(h: NDArray[np.uint64], partitions: int) -> NDArray[np.uint64]: ...
def partition_of_hash(h: int | NDArray[np.uint64], partitions: int) -> Any:  # numpy's stubs call uint64 & int signed; it is uint64
    """Kafka's default partitioner: the index, among a topic's `partitions` (sorted), of a
    keyed record's partition, from its key's murmur2 `h` (one hash, or an array of them:
    the same formula element-wise). Its only definition: every record placed by key goes
    where a Kafka producer would put it."""
    return (h & 0x7FFFFFFF) % partitions


def default_partition(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner: the partition of a keyed record among `partitions`."""
    return partition_of_hash(murmur2(key), partitions)


async def publish_bulk(producer: Any, topic: str, records: Iterable[Record]) -> list[Awaitable[Any]]:
    """Hand `records` to an aiokafka producer as one batch per partition (more if one
    fills up); the delivery futures of the batches."""
    records = list(records)
    keyed: list[bytes] = []
    for partition, key, _ in records:
        if partition is None:
            if key is None:
                raise ValueError(f"a record for {topic} without a key needs a partition")
            keyed.append(key)
    # every key hashed and placed at once, taken in record order below
    partitions = sorted(await producer.partitions_for(topic)) if keyed else []
    places = iter(partition_of_hash(murmur2_many(keyed), len(partitions)).tolist() if keyed else [])
    by_partition: dict[int, list[tuple[bytes | None, bytes | None]]] = {}
    for partition, key, value in records:
        if partition is None:
            partition = partitions[next(places)]
        by_partition.setdefault(partition, []).append((key, value))
    futures: list[Awaitable[Any]] = []
    for partition, items in by_partition.items():
        batch = producer.create_batch()
        for key, value in items:
            if batch.append(timestamp=None, key=key, value=value) is None:  # full: send it, start another
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                batch = producer.create_batch()
                if batch.append(timestamp=None, key=key, value=value) is None:
                    raise ValueError(f"a record of {len(value or b'')} bytes does not fit a batch of {topic}")
        futures.append(await producer.send_batch(batch, topic, partition=partition))
    return futures

