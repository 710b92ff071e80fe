"""Read one changelog partition to its true end, whatever the broker says its end is.

Faust recovers tables by reading each changelog partition up to its high watermark.
The embedded broker (Tansu) reports a high watermark that stops at the start of the
last batch, so a recovery can miss the newest state, which is the state a restarted
worker needs most. Before the worker uses a partition's state it therefore reads the
partition itself: it appends a barrier record (a tombstone under a unique key) and
reads from the beginning until it meets that barrier. Everything written before the
barrier, that is the whole partition, has then been read. This is correct on any
Kafka, not only on Tansu.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

BARRIER = "__barrier__"


def read_changelog_partition(
    bootstrap: str, topic: str, partition: int, client: dict[str, Any], timeout: float = 120.0
) -> dict[str, Any]:
    """The latest value of every live key of one changelog partition (JSON keys and values)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

    barrier_key = json.dumps(f"{partition}|{BARRIER}|{uuid.uuid4().hex}").encode()
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "log_level": 3, **client})
    producer.produce(topic, key=barrier_key, value=None, partition=partition)
    if producer.flush(30) != 0:
        raise RuntimeError(f"cannot write the recovery barrier to {topic}[{partition}]")
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"restore-{uuid.uuid4().hex}",
        "enable.auto.commit": False, "log_level": 3, **client,
    })  # fmt: skip
    consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
    state: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for msg in consumer.consume(50_000, 0.5):
                if msg.error() is not None:
                    continue
                raw_key = msg.key()
                if raw_key == barrier_key:
                    return state
                try:
                    key = json.loads(raw_key) if raw_key is not None else None
                except ValueError:
                    continue
                if not isinstance(key, str) or BARRIER in key:
                    continue
                value = msg.value()
                if value is None:
                    state.pop(key, None)
                else:
                    state[key] = json.loads(value)
    finally:
        consumer.close()
    raise TimeoutError(f"did not reach the recovery barrier of {topic}[{partition}] within {timeout:.0f} s")
