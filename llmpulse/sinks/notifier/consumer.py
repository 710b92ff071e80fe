"""Consuming `alerts`: every partition, offsets committed only once handled.

The notifier needs to see a whole group to digest it, so one notifier reads all
partitions of the alerts topic (`assign`, not a rebalancing subscription) under its
consumer group, starting from the group's committed offsets. An offset is committed
only when every alert before it has been notified (or needs no message, or went to
the dead-letter topic): a restart replays the rest, and the delivery log keeps the
replay from notifying twice.
"""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition

from llmpulse.config import Settings
from llmpulse.kafka.clients import consumer_settings
from llmpulse.kafka.topics import ALERTS
from llmpulse.sinks.notifier.logtopic import partitions_of

log = logging.getLogger(__name__)


class OffsetTracker:
    """Per partition: which consumed offsets are still held, and what may be committed."""

    def __init__(self) -> None:
        self._held: dict[int, dict[int, int]] = {}
        self._next: dict[int, int] = {}
        self._committed: dict[int, int] = {}

    def seen(self, partition: int, offset: int) -> None:
        if offset + 1 > self._next.get(partition, -1):
            self._next[partition] = offset + 1

    def hold(self, partition: int, offset: int, count: int = 1) -> None:
        if count > 0:
            held = self._held.setdefault(partition, {})
            held[offset] = held.get(offset, 0) + count

    def release(self, partition: int, offset: int) -> None:
        held = self._held.get(partition)
        if held is None or offset not in held:
            return
        held[offset] -= 1
        if held[offset] <= 0:
            del held[offset]

    def held_count(self) -> int:
        return sum(len(h) for h in self._held.values())

    def committable(self) -> dict[int, int]:
        """partition -> next offset to commit, for partitions whose position moved."""
        out: dict[int, int] = {}
        for partition, nxt in self._next.items():
            held = self._held.get(partition)
            position = min(held) if held else nxt
            if position != self._committed.get(partition):
                out[partition] = position
        return out

    def committed(self, offsets: dict[int, int]) -> None:
        self._committed.update(offsets)


class AlertConsumer:
    def __init__(self, settings: Settings, bootstrap: str) -> None:
        self.topic = settings.kafka.topic(ALERTS)
        conf = consumer_settings(bootstrap, settings.kafka, settings.notify.consumer_group)
        self._consumer = Consumer(conf)
        self.partitions = partitions_of(self._consumer, self.topic)
        # no offset given: each partition starts at the group's committed offset
        self._consumer.assign([TopicPartition(self.topic, p) for p in self.partitions])

    def consume(self, max_messages: int = 500, timeout: float = 0.2) -> list[Any]:
        out = []
        for m in self._consumer.consume(max_messages, timeout):
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("alerts consumer: %s", err)
                continue
            out.append(m)
        return out

    def commit(self, offsets: dict[int, int]) -> None:
        self._consumer.commit(
            offsets=[TopicPartition(self.topic, p, o) for p, o in sorted(offsets.items())],
            asynchronous=False,
        )

    def close(self) -> None:
        self._consumer.close()
