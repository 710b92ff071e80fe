"""Test helpers that talk to the real broker: produce, and read until the expected data is there.

Tansu reports a wrong high watermark, so nothing here reads "until the end": callers
say how many messages they expect (or a predicate), and we wait for them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from confluent_kafka import Consumer, Producer

from llmpulse.kafka.clients import produce_all


def produce(bootstrap: str, topic: str, values: Iterable[tuple[bytes | str | None, bytes]]) -> int:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "batch.size": 1_000_000, "log_level": 3})
    n, remaining = produce_all(p, ((topic, key, value) for key, value in values), 30)
    assert remaining == 0, f"{remaining} messages not delivered to {topic}"
    return n


def read_messages(
    bootstrap: str,
    topic: str,
    expect: int | None = None,
    until: Callable[[list[Any]], bool] | None = None,
    timeout: float = 60.0,
    quiet_s: float = 0.0,
) -> list[Any]:
    """Messages of `topic` from the start until `expect` arrived / `until` holds / `timeout`."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-reader-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "log_level": 3,
        }
    )
    c.subscribe([topic])
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    last_new = time.monotonic()
    try:
        while time.monotonic() < deadline:
            for m in c.consume(10_000, 0.5):
                if m.error() is None:
                    out.append(m)
                    last_new = time.monotonic()
            if expect is not None and len(out) >= expect and time.monotonic() - last_new >= quiet_s:
                break
            if until is not None and until(out) and time.monotonic() - last_new >= quiet_s:
                break
    finally:
        c.close()
    return out
