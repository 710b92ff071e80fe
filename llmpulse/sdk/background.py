"""Background publishing for the SDK: a bounded queue, one thread, flush at exit.

The app's thread only puts an event on a bounded queue (never more than
`sdk.enqueue_timeout_s`, 0 by default: a full queue drops the event and counts it).
A daemon thread finds the broker, batches events per model and hands them to
librdkafka. A missing broker never raises into the app: events wait in the queue,
then are dropped and counted. At exit, queued events get at most
`sdk.exit_flush_timeout_s` to be delivered.
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
    queued: int = 0
    sent: int = 0
    delivered: int = 0
    failed: int = 0
    dropped: int = 0


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
        self.stats = SdkStats()
        self._bootstrap = bootstrap
        self._queue: queue.Queue[CallEvent | _Flush | None] = queue.Queue(self.cfg.queue_size)
        self._lock = threading.Lock()
        self._producer: Any = None
        self._next_resolve = 0.0
        self._warned = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="llmpulse-sdk-publisher", daemon=True)
        self._thread.start()

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
        return ok

    # -- background thread ----------------------------------------------------------------
    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + n)

    def _ensure_producer(self) -> bool:
        if self._producer is not None:
            return True
        now = time.monotonic()
        if now < self._next_resolve:
            return False
        self._next_resolve = now + self.cfg.broker_retry_s
        try:
            from confluent_kafka import Producer

            from llmpulse.kafka.bootstrap import resolve_bootstrap
            from llmpulse.kafka.clients import producer_settings

            bootstrap = self._bootstrap or resolve_bootstrap(self.settings)
            conf = producer_settings(
                bootstrap,
                self.settings.kafka,
                **{
                    "linger.ms": 20,
                    "message.timeout.ms": int(self.cfg.delivery_timeout_s * 1000),
                    "queue.buffering.max.messages": max(1000, self.cfg.queue_size),
                    "acks": 1,
                    "log_level": 0,  # librdkafka would print to the app's stderr; one warning instead
                    "error_cb": self._on_error,
                },
            )
            self._producer = Producer(conf)
            return True
        except Exception as exc:
            if not self._warned:
                log.warning("llmpulse: cannot publish call events yet (%s); retrying", exc)
                self._warned = True
            return False

    def _on_error(self, err: Any) -> None:
        if not self._warned:
            self._warned = True
            log.warning("llmpulse: Kafka unreachable, call events wait in memory (bounded): %s", err)

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
                try:
                    self._producer.produce(self.topic, value=value, key=model, on_delivery=self._on_batch(len(part)))
                    self._count("sent", len(part))
                except Exception as exc:
                    self._count("dropped", len(part))
                    log.debug("llmpulse: dropped %d events: %s", len(part), exc)
        self._producer.poll(0)

    def _on_batch(self, n: int) -> Any:
        def cb(err: Any, _msg: Any) -> None:
            if err is None:
                self._count("delivered", n)
            else:
                self._count("failed", n)
                log.debug("llmpulse: %d events not delivered: %s", n, err)

        return cb

    def _finish_flush(self, req: _Flush) -> None:
        remaining = 0
        if self._producer is not None:
            remaining = int(self._producer.flush(max(0.0, req.deadline - time.monotonic())))
        req.remaining = remaining
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
                if self._producer is not None:
                    self._producer.poll(0)
                if isinstance(item, _Flush):
                    self._ensure_producer()
                    self._finish_flush(item)
                elif item is None:
                    if self._producer is not None:
                        self._producer.flush(0.1)
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
