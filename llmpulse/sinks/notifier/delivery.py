"""Delivery: retries with exponential backoff, Retry-After honoured, and the delivery log.

Each (group, receiver) delivers on its own task, so a receiver that stays down only
delays its own notifications. A transient failure (timeouts, 5xx, 429) is retried
for as long as it takes, waiting the larger of the backoff and the receiver's
Retry-After; a permanent one (bad credentials, unknown channel, 4xx) is logged,
counted and recorded as failed instead of being retried forever.

The delivery log is the compacted topic `notifications`: one `DeliveryRecord` per
aggregation group, written right after the receiver accepted the notification and
before any Kafka offset of the alerts it covers is committed. It holds the receiver's
handle of the incident's message (`Outcome.handle`, `Notification.logged`), so that an
update after a restart edits that message instead of posting another.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from llmpulse import metrics
from llmpulse.schemas.codec import decode_one, encode
from llmpulse.sinks.notifier.grouping import Notification
from llmpulse.sinks.notifier.logtopic import LogReader, LogWriter
from llmpulse.sinks.notifier.models import DeliveryRecord
from llmpulse.sinks.notifier.receivers.base import DeliveryError, MessageRef, Receiver

log = logging.getLogger(__name__)


Pause = Callable[[float], Awaitable[bool]]
"""Sleep that returns False (early) when the notifier is stopping."""


async def _sleep(seconds: float) -> bool:
    await asyncio.sleep(seconds)
    return True


@dataclass
class Outcome:
    status: Literal["delivered", "failed", "aborted"]
    attempts: int
    error: str = ""
    handle: MessageRef | None = None  # the receiver's handle of what it posted or edited


class Backoff:
    """initial, 2x, 4x ... capped at `maximum`, with up to 10% jitter."""

    def __init__(self, initial: float, maximum: float, jitter: Callable[[], float] = random.random) -> None:
        self.initial = initial
        self.maximum = maximum
        self._next = initial
        self._jitter = jitter

    def next(self) -> float:
        delay = min(self._next, self.maximum)
        self._next = min(self._next * 2, self.maximum)
        return delay * (1 + 0.1 * self._jitter())


class RateGate:
    """A receiver's "not before": a 429's Retry-After holds every notification to it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._not_before = 0.0

    def hold_for(self, seconds: float) -> None:
        self._not_before = max(self._not_before, self._clock() + seconds)

    async def wait(self, pause: Pause = _sleep) -> bool:
        while (left := self._not_before - self._clock()) > 0:
            if not await pause(left):
                return False
        return True


async def deliver(
    receiver: Receiver,
    notification: Notification,
    retry_initial_s: float,
    retry_max_s: float,
    gate: RateGate | None = None,
    pause: Pause = _sleep,
) -> Outcome:
    """Send until it lands or fails permanently.

    An attempt in progress always completes (so what was sent gets logged); waiting
    for the next attempt ends early, as "aborted", when `pause` reports a stop.
    """
    backoff = Backoff(retry_initial_s, retry_max_s)
    gate = gate or RateGate()
    attempts = 0
    while True:
        if not await gate.wait(pause):
            return Outcome("aborted", attempts)
        attempts += 1
        try:
            handle = await receiver.send(notification)
        except DeliveryError as exc:
            if exc.permanent:
                metrics.NOTIFICATIONS.labels(receiver.name, "failed").inc()
                log.error(
                    "notification %s to %s failed permanently (not retried): %s",
                    notification.notification_id,
                    receiver.name,
                    exc,
                )
                return Outcome("failed", attempts, str(exc))
            delay = backoff.next()
            if exc.retry_after is not None:
                gate.hold_for(exc.retry_after)
                delay = max(delay, exc.retry_after)
            metrics.NOTIFICATIONS.labels(receiver.name, "retried").inc()
            log.warning(
                "notification %s to %s: attempt %d failed (%s); retrying in %.1fs",
                notification.notification_id,
                receiver.name,
                attempts,
                exc,
                delay,
            )
            if not await pause(delay):
                return Outcome("aborted", attempts)
            continue
        metrics.NOTIFICATIONS.labels(receiver.name, "delivered").inc()
        return Outcome("delivered", attempts, handle=handle)


class DeliveryLog:
    """The `notifications` topic: read it whole at start, append a record per notification."""

    def __init__(self, writer: LogWriter, reader: LogReader) -> None:
        self.writer = writer
        self.reader = reader

    def load(self, timeout: float = 60.0) -> dict[str, DeliveryRecord]:
        records: dict[str, DeliveryRecord] = {}

        def take(key: str, value: bytes | None) -> None:
            if value is None:
                records.pop(key, None)
                return
            try:
                record = decode_one(value, DeliveryRecord)
            except ValueError as exc:
                log.warning("ignoring an invalid delivery-log record %r: %s", key, exc)
                return
            records[record.group_id] = record

        self.reader.read_to_end(take, timeout)
        return records

    async def append(self, record: DeliveryRecord) -> None:
        await self.writer.write(record.group_id, encode(record))

    def close(self) -> None:
        self.reader.close()
        self.writer.close()
