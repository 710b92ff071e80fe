"""Micro-batching of encoded events per message key, under the proxy's event loop.

The Faust worker handles batch envelopes (``{"schema_version": N, "events": [...]}``,
see ``llmpulse.schemas.codec``) an order of magnitude faster than one event per
message, so the proxy gathers the CallEvents of one key (the model: the partitioning
that keeps a model's windows together) and publishes them as one envelope when

* the key's buffer holds `max_events` events, or its values `MAX_BATCH_BYTES`, or
* `linger_s` has passed since the buffer's first event (a ``loop.call_later`` timer),
* or on `close()` (the proxy's stop path): nothing buffered is lost on a clean stop.

Everything here runs on the event loop thread and never waits: adding is a list
append, publishing is the publisher's non-blocking ``publish_raw``. A buffer of one
event goes out as the plain event (the bytes the proxy sent before batching), so
``max_events=1`` or ``linger_s=0`` gives one message per call, as before.

Drops are counted in events: when ``publish_raw`` refuses an envelope (queue and
spool full), all of its events count as dropped (`dropped_events`); the publisher's
drop metric counts them too (``events_in`` of the envelope).

Guarantee: an event added here survives the death of the process (SIGKILL, OOM) from
`add()` on. The buffer and the publisher's queue are memory: a proxy killed within
`linger_s` of answering a call lost that call's event (the chaos benchmark measured about
one per SIGKILL). So, when the publisher keeps an in-flight log
(``SpoolingPublisher.log_accepted``, the proxy's), `add()` first writes the event to it
(one buffered ``write`` to the page cache, no fsync: the OS outlives the process); the
envelope that later carries the event hands its log records to ``publish_raw(logged=)``,
and the publisher settles them once that envelope is delivered, spooled or dropped. A
process started on the same data dir replays what was never settled, so an event is
replayed by our recovery at most once more than it was delivered (at least once; the
worker dedupes by `event_id`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Protocol, cast

from llmpulse.producers.spool import events_in  # re-exported: how many events a message holds
from llmpulse.schemas.base import SCHEMA_VERSION

__all__ = ["KeyedBatcher", "RawPublisher", "envelope", "events_in"]

log = logging.getLogger(__name__)

# well under Kafka's default 1 MB message limit (captured prompts make events large)
MAX_BATCH_BYTES = 512 * 1024


class RawPublisher(Protocol):
    """What the proxy needs of a publisher (EventPublisher and SpoolingPublisher fit)."""

    def publish_raw(self, topic: str, value: bytes, key: bytes | str | None = None) -> bool: ...


class LoggingPublisher(Protocol):
    """A publisher with an in-flight log (SpoolingPublisher): events are logged when accepted."""

    def log_accepted(self, topic: str, value: bytes, key: bytes | str | None = None) -> int: ...

    def publish_raw(
        self, topic: str, value: bytes, key: bytes | str | None = None, logged: tuple[tuple[int, int], ...] = ()
    ) -> bool: ...


def envelope(values: list[bytes]) -> bytes:
    """A batch envelope of already encoded events (what ``codec.encode_batch`` writes)."""
    return b'{"schema_version":%d,"events":[%s]}' % (SCHEMA_VERSION, b",".join(values))


@dataclass(slots=True)
class _Buffer:
    values: list[bytes] = field(default_factory=list)
    nbytes: int = 0
    timer: asyncio.TimerHandle | None = None
    logged: dict[int, int] = field(default_factory=dict)  # in-flight log segment -> events of this buffer in it


class KeyedBatcher:
    """Buffers encoded events per key and publishes envelopes (call from the loop thread only)."""

    def __init__(
        self,
        publisher: RawPublisher,
        topic: str,
        *,
        max_events: int = 200,
        linger_s: float = 0.05,
        max_bytes: int = MAX_BATCH_BYTES,
    ) -> None:
        self.publisher = publisher
        self.topic = topic
        self.max_events = max(1, max_events)
        self.linger_s = max(0.0, linger_s)
        self.max_bytes = max_bytes
        self._buffers: dict[str, _Buffer] = {}
        self.closed = False
        self.messages = 0  # messages published (envelopes and single events)
        self.events = 0  # events in them
        self.dropped_events = 0  # events of messages the publisher refused
        # the publisher's in-flight log, when it keeps one: events are written to it in add()
        self._logging: LoggingPublisher | None = (
            cast(LoggingPublisher, publisher) if callable(getattr(publisher, "log_accepted", None)) else None
        )

    @property
    def batching(self) -> bool:
        return self.max_events > 1 and self.linger_s > 0 and not self.closed

    @property
    def buffered(self) -> int:
        return sum(len(b.values) for b in self._buffers.values())

    def add(self, key: str, value: bytes) -> None:
        seg = 0
        if self._logging is not None:  # durable from here on (see the module docstring)
            try:
                seg = self._logging.log_accepted(self.topic, value, key)
            except Exception as exc:  # monitoring never fails the proxy
                log.warning("cannot log a call event: %s", exc)
        if not self.batching:
            self._publish(key, [value], {seg: 1} if seg else None)
            return
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = _Buffer()
        if buf.values and buf.nbytes + len(value) > self.max_bytes:
            self.flush_key(key)  # this value would make the envelope too large
            buf = self._buffers[key] = _Buffer()
        buf.values.append(value)
        buf.nbytes += len(value) + 1
        if seg:
            buf.logged[seg] = buf.logged.get(seg, 0) + 1
        if len(buf.values) >= self.max_events:
            self.flush_key(key)
        elif buf.timer is None:
            buf.timer = asyncio.get_running_loop().call_later(self.linger_s, self._linger_expired, key)

    def _linger_expired(self, key: str) -> None:
        buf = self._buffers.get(key)
        if buf is not None:
            buf.timer = None
            self.flush_key(key)

    def flush_key(self, key: str) -> None:
        buf = self._buffers.pop(key, None)
        if buf is None:
            return
        if buf.timer is not None:
            buf.timer.cancel()
            buf.timer = None
        if buf.values:
            self._publish(key, buf.values, buf.logged)

    def flush(self) -> None:
        """Publish every buffer now."""
        for key in list(self._buffers):
            self.flush_key(key)

    def close(self) -> None:
        """Publish every buffer; later events are published at once (one message each)."""
        self.closed = True
        self.flush()

    def _publish(self, key: str, values: list[bytes], logged: dict[int, int] | None = None) -> None:
        value = values[0] if len(values) == 1 else envelope(values)
        try:
            if logged and self._logging is not None:  # the publisher settles these log records
                ok = self._logging.publish_raw(self.topic, value, key, logged=tuple(logged.items()))
            else:
                ok = self.publisher.publish_raw(self.topic, value, key)
        except Exception as exc:  # monitoring never fails the proxy
            if logged:  # unsettled in the in-flight log: the next process replays them, not lost
                log.warning("cannot publish %d call events (kept in the in-flight log for the next start): %s",
                            len(values), exc)  # fmt: skip
                ok = True
            else:
                log.warning("cannot publish %d call events: %s", len(values), exc)
                ok = False
        self.messages += 1
        self.events += len(values)
        if not ok:
            self.dropped_events += len(values)

