"""Background publishing for the SDK: a bounded queue, one thread, flush at exit.

The app's thread only puts an event on a bounded queue (never more than
`sdk.enqueue_timeout_s`, 0 by default: a full queue drops the event and counts it).
A daemon thread finds the broker, batches events per model and hands the messages
to a SpoolingPublisher with a memory spool (`llmpulse.producers.spool`): a message
the broker does not acknowledge within `sdk.delivery_timeout_s`, one stuck in
librdkafka's queue, and one the broker acknowledged just before it went down are
kept in memory (at most `sdk.spool_max_bytes`) and sent again when a broker answers.
Before, a failed delivery report lost its events without counting them, and the
stop path flushed for 0.1 s and forgot what was left in librdkafka's queue.

A missing broker never raises into the app. Events are dropped, and counted
(`stats.dropped`), only when the queue or the memory spool is full, or when the
process exits with events still undelivered: at exit they get at most
`sdk.exit_flush_timeout_s`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from llmpulse.config import Settings
from llmpulse.producers.keyhash import KeyHasher, load_secret
from llmpulse.producers.pricing import PriceTable
from llmpulse.producers.redaction import Redactor
from llmpulse.schemas import CallEvent
from llmpulse.schemas.codec import encode, encode_batch

log = logging.getLogger("llmpulse.sdk")


@dataclass
class SdkStats:
    queued: int = 0  # events accepted by submit()
    sent: int = 0  # events handed to the publisher
    delivered: int = 0  # events acknowledged by Kafka (again after a resend)
    failed: int = 0  # failed delivery reports (messages; their events were kept for a retry)
    dropped: int = 0  # events lost: queue or memory spool full, or undelivered at exit


@dataclass
class _Flush:
    done: threading.Event = field(default_factory=threading.Event)
    deadline: float = 0.0
    remaining: int = 0


class BackgroundPublisher:
    """Publishes CallEvents to `<prefix>calls` from a daemon thread; `submit` never blocks long."""

    def __init__(self, settings: Settings, bootstrap: str | None = None) -> None:
        self.settings = settings
        self.cfg = settings.sdk
        self.topic = settings.kafka.topic("calls")
        self._stats = SdkStats()
        self._bootstrap = bootstrap
        self._queue: queue.Queue[CallEvent | _Flush | None] = queue.Queue(self.cfg.queue_size)
        self._lock = threading.Lock()
        self._producer: Any = None
        self._next_resolve = 0.0
        self._warned = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="llmpulse-sdk-publisher", daemon=True)
        self._thread.start()

    @property
    def stats(self) -> SdkStats:
        """This publisher's counts, with the deliveries and drops of its Kafka publisher."""
        with self._lock:
            s = SdkStats(**vars(self._stats))
        pub = self._producer
        if pub is not None:
            s.delivered += pub.stats.delivered_events
            s.failed += pub.stats.failed_deliveries
            s.dropped += pub.stats.dropped
        return s

    # -- app side -----------------------------------------------------------------------
    def submit(self, event: CallEvent) -> bool:
        """Queue one event; False (counted as dropped) when the queue stays full."""
        if self._closed:
            self._count("dropped")
            return False
        try:
            if self.cfg.enqueue_timeout_s > 0:
                self._queue.put(event, timeout=self.cfg.enqueue_timeout_s)
            else:
                self._queue.put_nowait(event)
        except queue.Full:
            self._count("dropped")
            return False
        self._count("queued")
        return True

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait up to `timeout` s until every queued event is delivered; True when none is left."""
        if not self._thread.is_alive():
            return self._queue.empty()
        req = _Flush(deadline=time.monotonic() + timeout)
        try:
            self._queue.put(req, timeout=max(0.0, timeout))
        except queue.Full:
            return False
        req.done.wait(max(0.0, req.deadline - time.monotonic()) + 0.05)
        return req.done.is_set() and req.remaining == 0

    def close(self, timeout: float | None = None) -> bool:
        """Flush within `timeout` (default sdk.exit_flush_timeout_s) and stop the thread."""
        if self._closed:
            return True
        bound = self.cfg.exit_flush_timeout_s if timeout is None else timeout
        ok = self.flush(bound)
        self._closed = True
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(0.2)
        left = self._queue.qsize()
        if left:  # the thread did not get to them (no broker was ever found): lost with the process
            self._count("dropped", sum(1 for item in list(self._queue.queue) if isinstance(item, CallEvent)))
        if self._producer is not None:
            self._producer.close(timeout=0.2)  # counts what its memory spool still holds as dropped
        return ok

    # -- background thread ----------------------------------------------------------------
    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self._stats, name, getattr(self._stats, name) + n)

    def _ensure_producer(self) -> bool:
        if self._producer is not None:
            return True
        now = time.monotonic()
        if now < self._next_resolve:
            return False
        self._next_resolve = now + self.cfg.broker_retry_s
        try:
            from llmpulse.kafka.bootstrap import resolve_bootstrap
            from llmpulse.kafka.clients import producer_settings
            from llmpulse.producers.spool import SpoolingPublisher

            bootstrap = self._bootstrap or resolve_bootstrap(self.settings)
            conf = producer_settings(
                bootstrap,
                self.settings.kafka,
                **{
                    "linger.ms": 20,
                    "queue.buffering.max.messages": max(1000, self.cfg.queue_size),
                    "acks": 1,
                    "log_level": 0,  # librdkafka would print to the app's stderr; one warning instead
                },
            )
            self._producer = SpoolingPublisher(
                conf,
                None,  # an app gets no spool files: the spool is in memory
                spool_max_bytes=self.cfg.spool_max_bytes,
                queue_size=max(1000, self.cfg.queue_size),
                delivery_timeout_s=self.cfg.delivery_timeout_s,
                retry_s=self.cfg.broker_retry_s,
                component="sdk",
                hold_s=min(self.cfg.delivery_timeout_s, 15.0),
                hold_max_bytes=self.cfg.spool_max_bytes,
            )
            return True
        except Exception as exc:
            if not self._warned:
                log.warning("llmpulse: cannot publish call events yet (%s); retrying", exc)
                self._warned = True
            return False

    def _send(self, events: list[CallEvent]) -> None:
        if not self._ensure_producer():
            self._count("dropped", len(events))
            return
        groups: dict[str, list[CallEvent]] = defaultdict(list)
        for e in events:
            groups[e.model].append(e)
        for model, group in groups.items():
            for i in range(0, len(group), self.cfg.batch_max):
                part = group[i : i + self.cfg.batch_max]
                value = encode(part[0]) if len(part) == 1 else encode_batch(part)
                # never raises; a refusal (memory spool full) is counted in the publisher's drops
                self._producer.publish_raw(self.topic, value, model)
                self._count("sent", len(part))

    def _finish_flush(self, req: _Flush) -> None:
        idle = True
        if self._producer is not None:
            idle = self._producer.flush(max(0.0, req.deadline - time.monotonic()))
        req.remaining = 0 if idle else 1
        req.done.set()

    def _run(self) -> None:
        batch: list[CallEvent] = []
        started = 0.0
        interval = self.cfg.flush_interval_s
        while True:
            timeout = interval if not batch else max(0.0, interval - (time.monotonic() - started))
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = _TICK
            try:
                if isinstance(item, CallEvent):
                    if not batch:
                        started = time.monotonic()
                    batch.append(item)
                    if len(batch) < self.cfg.batch_max and time.monotonic() - started < interval:
                        continue
                # a full or old batch, a tick, a flush request or the stop: send what there is
                if batch:
                    self._send(batch)
                    batch = []
                if isinstance(item, _Flush):
                    self._ensure_producer()
                    self._finish_flush(item)
                elif item is None:
                    return
            except Exception as exc:
                log.warning("llmpulse: publishing failed: %s", exc)
                batch = []


_TICK: Any = object()


class SdkRuntime:
    """What every recorded call needs: settings, the publisher, key hasher, prices, redactor."""

    def __init__(self, settings: Settings, bootstrap: str | None = None, enabled: bool | None = None) -> None:
        self.settings = settings
        self.enabled = settings.sdk.enabled if enabled is None else enabled
        self.app = settings.sdk.app
        self.provider = settings.sdk.provider
        self.prices = PriceTable.from_config(settings.pricing)
        self.capture = settings.capture
        self.redactor = Redactor(settings.capture.extra_patterns) if settings.capture.enabled else None
        self._hasher: KeyHasher | None = None
        self.publisher = BackgroundPublisher(settings, bootstrap) if self.enabled else None

    @property
    def hasher(self) -> KeyHasher:
        if self._hasher is None:
            data_dir = self.settings.data_dir
            try:
                secret = load_secret(data_dir if data_dir.is_dir() else None)
            except Exception as exc:
                log.warning("llmpulse: key-hash secret unreadable (%s); using a per-process secret", exc)
                secret = load_secret(None, environ={})
            self._hasher = KeyHasher(secret)
        return self._hasher

    def submit(self, event: CallEvent) -> bool:
        if self.publisher is None:
            return False
        return self.publisher.submit(event)


_runtime: SdkRuntime | None = None
_runtime_lock = threading.Lock()
_atexit_registered = False


def _disabled_runtime(reason: str) -> SdkRuntime:
    log.warning("llmpulse: call recording is off: %s", reason)
    return SdkRuntime(Settings(), enabled=False)


def runtime() -> SdkRuntime:
    """The process-wide SDK runtime, configured from the environment on first use."""
    global _runtime
    rt = _runtime
    if rt is not None:
        return rt
    with _runtime_lock:
        if _runtime is None:
            try:
                from llmpulse.sdk.settings import load_sdk_settings

                _install(SdkRuntime(load_sdk_settings()))
            except Exception as exc:
                _install(_disabled_runtime(str(exc)))
        assert _runtime is not None
        return _runtime


def _install(rt: SdkRuntime) -> None:
    global _runtime, _atexit_registered
    _runtime = rt
    if not _atexit_registered:
        atexit.register(_at_exit)
        _atexit_registered = True


def _at_exit() -> None:
    rt = _runtime
    if rt is not None and rt.publisher is not None:
        rt.publisher.close()


def configure(
    settings: Settings | None = None, *, bootstrap: str | None = None, **overrides: Any
) -> SdkRuntime:
    """Replace the SDK runtime: explicit Settings, or the environment plus dotted overrides
    (``configure(**{"sdk.app": "billing", "kafka.url": "kafka://host:9092"})``).
    The previous runtime is flushed (within its exit bound) and closed."""
    from llmpulse.sdk.settings import load_sdk_settings

    new = SdkRuntime(settings if settings is not None else load_sdk_settings(overrides=overrides), bootstrap)
    with _runtime_lock:
        old = _runtime
        _install(new)
    if old is not None and old.publisher is not None:
        old.publisher.close()
    return new


def flush(timeout: float = 5.0) -> bool:
    """Deliver every call recorded so far, waiting at most `timeout` seconds."""
    rt = runtime()
    return True if rt.publisher is None else rt.publisher.flush(timeout)
