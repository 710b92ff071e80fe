"""Publish wire models to Kafka without ever blocking or failing the caller (samples, demo traffic).

confluent-kafka's producer already queues in memory and sends from its own thread;
this wrapper keeps that queue bounded, never raises into the caller, and counts what
it had to drop, so that a slow or absent broker costs the app nothing but the count.
It is for periodic samples (GPU, host) and demo traffic, where a newer sample follows:
no spool. A message refused by a full queue, or not delivered within librdkafka's
`message.timeout.ms`, is dropped and counted in events (``stats.dropped``,
``llmpulse_publish_dropped_total{component}``); before, a failed delivery was only a log
line. ``llmpulse_events_out_total`` counts delivered events. Call events, which must not
be lost, go through ``llmpulse.producers.spool.SpoolingPublisher``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmpulse.producers.spool import events_in
from llmpulse.schemas.base import WireModel
from llmpulse.schemas.codec import encode, encode_batch

log = logging.getLogger(__name__)

try:
    from llmpulse.metrics import EVENTS_OUT, PUBLISH_DROPPED

    _METRICS = True
except ImportError:  # pragma: no cover - light install without prometheus-client
    _METRICS = False


@dataclass
class PublishStats:
    sent: int = 0
    delivered: int = 0
    failed: int = 0
    dropped: int = 0


class EventPublisher:
    def __init__(self, settings: dict[str, Any], max_queued: int = 100_000, component: str = "publisher") -> None:
        from confluent_kafka import Producer

        self._producer = Producer({"queue.buffering.max.messages": max_queued, **settings})
        self.stats = PublishStats()
        self.component = component
        self._lock = threading.Lock()

    def _on_delivery(self, err: Any, msg: Any) -> None:
        n = events_in(msg.value())
        with self._lock:
            if err is None:
                self.stats.delivered += 1
            else:
                self.stats.failed += 1
        if err is None:
            if _METRICS:
                EVENTS_OUT.labels(self.component, msg.topic()).inc(n)
            return
        self._count_drop(n)
        log.warning("%d events not delivered, dropped: %s", n, err)

    def _count_drop(self, n: int) -> None:
        with self._lock:
            self.stats.dropped += n
        if _METRICS:
            PUBLISH_DROPPED.labels(self.component).inc(n)

    def publish_raw(self, topic: str, value: bytes, key: bytes | str | None = None) -> bool:
        """Queue one message; False (and counted as dropped) when the queue is full."""
        try:
            self._producer.produce(topic, value=value, key=key, on_delivery=self._on_delivery)
        except BufferError:
            self._producer.poll(0)
            self._count_drop(events_in(value))
            return False
        except Exception as exc:
            log.warning("cannot queue event for %s: %s", topic, exc)
            self._count_drop(events_in(value))
            return False
        with self._lock:
            self.stats.sent += 1
        self._producer.poll(0)
        return True

    def publish(self, topic: str, event: WireModel, key: str | None = None) -> bool:
        return self.publish_raw(topic, encode(event), key)

    def publish_batch(self, topic: str, events: Sequence[WireModel], key: str | None = None) -> bool:
        return self.publish_raw(topic, encode_batch(events), key)

    def poll(self, timeout: float = 0.0) -> None:
        self._producer.poll(timeout)

    def flush(self, timeout: float = 10.0) -> int:
        """Wait up to `timeout` for queued messages; returns how many are still queued."""
        return int(self._producer.flush(timeout))

    def __len__(self) -> int:
        return len(self._producer)
