"""librdkafka settings for producers and consumers, tuned for throughput and at-least-once."""

from __future__ import annotations

from typing import Any

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
