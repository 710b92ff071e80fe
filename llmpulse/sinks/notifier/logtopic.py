"""Internal compacted topics (silences, delivery log): read all of it, write with an ack.

Some brokers (Tansu) report wrong high watermarks, so "read to the end" here never
trusts them: the reader first writes a barrier (a tombstone with a unique key) to
every partition and reads until it has seen its own barrier in each. Everything
written before the barrier has then been read.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from llmpulse.errors import BrokerError

BARRIER_PREFIX = "barrier|"

Handler = Callable[[str, bytes | None], None]


def partitions_of(client: Consumer | Producer, topic: str, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        md = client.list_topics(topic, timeout=5)
        meta = md.topics.get(topic)
        if meta is not None and meta.error is None and meta.partitions:
            return sorted(meta.partitions)
        if time.monotonic() > deadline:
            raise BrokerError(f"topic {topic} is missing: run ensure_topics (`llmpulse broker` creates it)")
        time.sleep(0.2)


class LogWriter:
    """A producer for one internal topic; `write` returns once the broker acknowledged."""

    def __init__(self, producer_conf: dict[str, Any], topic: str) -> None:
        self.topic = topic
        self._producer = Producer({**producer_conf, "linger.ms": 0})

    def write_sync(self, key: str | None, value: bytes | None, timeout: float = 30.0) -> None:
        done = threading.Event()
        errors: list[Any] = []

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                errors.append(err)
            done.set()

        self._producer.produce(
            self.topic, key=key.encode() if key is not None else None, value=value, on_delivery=on_delivery
        )
        deadline = time.monotonic() + timeout
        while not done.is_set():
            self._producer.poll(0.05)
            if time.monotonic() > deadline:
                raise BrokerError(f"no acknowledgement from Kafka for {self.topic} within {timeout}s")
        if errors:
            raise BrokerError(f"cannot write to {self.topic}: {errors[0]}")

    async def write(self, key: str | None, value: bytes | None) -> None:
        await asyncio.to_thread(self.write_sync, key, value)

    def barrier(self, partitions: list[int]) -> str:
        key = f"{BARRIER_PREFIX}{uuid.uuid4().hex}"
        for p in partitions:
            self._producer.produce(self.topic, key=key.encode(), value=None, partition=p)
        if self._producer.flush(30) != 0:
            raise BrokerError(f"cannot write a read barrier to {self.topic}")
        return key

    def close(self) -> None:
        self._producer.flush(10)


class LogReader:
    """Reads a whole internal topic, then (optionally) keeps following it."""

    def __init__(self, consumer_conf: dict[str, Any], writer: LogWriter) -> None:
        conf = {k: v for k, v in consumer_conf.items() if k != "group.id"}
        self._consumer = Consumer({**conf, "group.id": f"llmpulse-log-{uuid.uuid4().hex}"})
        self._writer = writer
        self.topic = writer.topic
        self._partitions = partitions_of(self._consumer, self.topic)
        self._consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in self._partitions])
        self._lock = threading.Lock()

    def _handle(self, msgs: list[Any], handler: Handler, barrier: str | None, seen: set[int]) -> None:
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    raise BrokerError(f"cannot read {self.topic}: {err}")
                continue
            raw_key = m.key()
            key = raw_key.decode("utf-8", "replace") if raw_key is not None else ""
            if key.startswith(BARRIER_PREFIX):
                if key == barrier:
                    seen.add(m.partition())
                continue
            handler(key, m.value())

    def read_to_end(self, handler: Handler, timeout: float = 60.0) -> None:
        """Hand every record written before this call to `handler(key, value)`."""
        with self._lock:
            barrier = self._writer.barrier(self._partitions)
            seen: set[int] = set()
            deadline = time.monotonic() + timeout
            while len(seen) < len(self._partitions):
                if time.monotonic() > deadline:
                    raise BrokerError(f"cannot read {self.topic} to its end within {timeout}s")
                self._handle(self._consumer.consume(10_000, 0.2), handler, barrier, seen)

    def poll(self, handler: Handler, timeout: float = 0.2) -> None:
        """Hand records that arrived since the last call."""
        with self._lock:
            self._handle(self._consumer.consume(10_000, timeout), handler, None, set())

    def close(self) -> None:
        with self._lock:
            self._consumer.close()
