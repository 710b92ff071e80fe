"""librdkafka settings for producers and consumers, tuned for throughput and at-least-once;
and `produce_all`, the loop that hands a stream of messages to a producer without losing
one to a full local queue."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from confluent_kafka import Producer

from llmpulse.config.kafka import KafkaConfig
from llmpulse.kafka.topics import client_security


def producer_settings(bootstrap: str, cfg: KafkaConfig, **extra: Any) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "linger.ms": 5,
        "batch.size": 1_000_000,
        "compression.type": "none",
        "acks": "all",
        "enable.idempotence": False,
        "queue.buffering.max.messages": 1_000_000,
        "log_level": 3,
        **client_security(cfg),
        **extra,
    }


def consumer_settings(bootstrap: str, cfg: KafkaConfig, group: str, **extra: Any) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "session.timeout.ms": cfg.session_timeout_ms,
        "heartbeat.interval.ms": max(500, cfg.session_timeout_ms // 6),
        "max.poll.interval.ms": 300_000,
        "fetch.max.bytes": 52_428_800,
        "log_level": 3,
        **client_security(cfg),
        **extra,
    }


Message = tuple[str, bytes | str | None, bytes]
"""(topic, key, value)."""


def produce_all(
    producer: Producer, messages: Iterable[Message], flush_timeout_s: float = 30.0, poll_every: int = 10_000
) -> tuple[int, int]:
    """Produce every message, then flush: (messages produced, messages still undelivered).

    A full local queue (BufferError) is waited out by serving delivery reports, never
    skipped; every `poll_every` messages the reports are served anyway, so a long stream
    does not hold them all."""
    n = 0
    for topic, key, value in messages:
        while True:
            try:
                producer.produce(topic, key=key, value=value)
                break
            except BufferError:
                producer.poll(0.05)
        n += 1
        if n % poll_every == 0:
            producer.poll(0)
    return n, producer.flush(flush_timeout_s)
