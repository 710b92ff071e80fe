"""The notifier: alerts in, grouped and muted, out to receivers, once each.

In-process use (what `llmpulse up` does)::

    notifier = Notifier(settings)          # bootstrap=... to skip resolve_bootstrap
    await notifier.run()                   # until notifier.stop() (thread-safe)

`run_notifier(settings)` is the blocking form used by `llmpulse notify`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Mapping

from llmpulse import metrics
from llmpulse.actions.hints import configure_hints
from llmpulse.config import Settings
from llmpulse.errors import LLMPulseError
from llmpulse.kafka.bootstrap import resolve_bootstrap
from llmpulse.kafka.clients import consumer_settings, producer_settings
from llmpulse.kafka.topics import ALERTS, DEADLETTER, NOTIFICATIONS, ensure_topics
from llmpulse.schemas.alert import Alert
from llmpulse.schemas.codec import decode, encode
from llmpulse.schemas.deadletter import DeadLetter
from llmpulse.sinks.notifier.consumer import AlertConsumer, OffsetTracker
from llmpulse.sinks.notifier.delivery import Backoff, DeliveryLog, RateGate, deliver
from llmpulse.sinks.notifier.grouping import Dispatcher, Flush, Group
from llmpulse.sinks.notifier.logtopic import LogReader, LogWriter
from llmpulse.sinks.notifier.models import DeliveryRecord
from llmpulse.sinks.notifier.receivers import Receiver, build_receivers
from llmpulse.sinks.notifier.routing import Router
from llmpulse.sinks.notifier.silences import SilenceTopic

log = logging.getLogger(__name__)
COMPONENT = "notify"


class Notifier:
    def __init__(
        self,
        settings: Settings,
        *,
        bootstrap: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.cfg = settings.notify
        self._bootstrap = bootstrap
        self._environ = environ
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._stop_requested = False
        self.started = threading.Event()
        self.tracker = OffsetTracker()
        self._flushes: set[asyncio.Task[None]] = set()
        self._kafka_lock = asyncio.Lock()
        self._gates: dict[str, RateGate] = {}
        # Slack messages of alerts whose action awaits approval say so and how to approve
        configure_hints(settings.actions)

    # -- lifecycle ---------------------------------------------------------------------

    def stop(self) -> None:
        """Ask run() to finish; safe from any thread and from signal handlers."""
        self._stop_requested = True
        loop, ev = self._loop, self._stopping
        if loop is not None and ev is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(ev.set)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        if self._stop_requested:
            return
        settings, cfg = self.settings, self.cfg
        bootstrap = self._bootstrap or resolve_bootstrap(settings)
        receivers = build_receivers(cfg, self._environ)
        try:
            router = Router(cfg)
        except ValueError as exc:
            raise LLMPulseError(f"notify.routes: {exc}") from None
        await asyncio.to_thread(ensure_topics, bootstrap, settings.kafka)
        silences = await asyncio.to_thread(SilenceTopic, settings, bootstrap)
        log_writer = LogWriter(producer_settings(bootstrap, settings.kafka), settings.kafka.topic(NOTIFICATIONS))
        delivery_log = DeliveryLog(
            log_writer,
            await asyncio.to_thread(LogReader, consumer_settings(bootstrap, settings.kafka, "unused"), log_writer),
        )
        dead_letters = LogWriter(producer_settings(bootstrap, settings.kafka), settings.kafka.topic(DEADLETTER))
        consumer: AlertConsumer | None = None
        try:
            await asyncio.to_thread(silences.load)
            records = await asyncio.to_thread(delivery_log.load)
            dispatcher = Dispatcher(router, silences.store, cfg.send_resolved)
            for record in records.values():
                dispatcher.restore(record)
            consumer = await asyncio.to_thread(AlertConsumer, settings, bootstrap)
            log.info(
                "notifier started: %d receivers, %d routes, %d groups restored from the delivery log",
                len(receivers),
                len(router.routes),
                len(dispatcher.groups),
            )
            self.started.set()
            tasks = [
                asyncio.create_task(self._consume(consumer, dispatcher, dead_letters)),
                asyncio.create_task(self._tick(dispatcher, receivers, delivery_log)),
                asyncio.create_task(self._commit_loop(consumer)),
                asyncio.create_task(self._follow_silences(silences)),
            ]
            stop_wait = asyncio.create_task(self._stopping.wait())
            await asyncio.wait([*tasks, stop_wait], return_when=asyncio.FIRST_COMPLETED)
            # Stop: loops end at their next turn; a flush that is sending finishes its
            # attempt and logs it, one that waits to retry gives up (its alerts replay).
            self._stopping.set()
            failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
            await asyncio.gather(*tasks, *list(self._flushes), return_exceptions=True)
            await self._commit(consumer)
            if failed:
                raise failed[0].exception()  # type: ignore[misc]
        finally:
            if consumer is not None:
                await asyncio.to_thread(consumer.close)
            for r in receivers.values():
                with contextlib.suppress(Exception):
                    await r.close()
            await asyncio.to_thread(silences.close)
            await asyncio.to_thread(delivery_log.close)
            await asyncio.to_thread(dead_letters.close)
            log.info("notifier stopped")

    # -- loops -------------------------------------------------------------------------

    def _running(self) -> bool:
        return self._stopping is not None and not self._stopping.is_set()

    async def _pause(self, seconds: float) -> bool:
        """Sleep; False when the notifier is stopping (at once, or during the sleep)."""
        assert self._stopping is not None
        if self._stopping.is_set():
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return not self._stopping.is_set()

    async def _consume(self, consumer: AlertConsumer, dispatcher: Dispatcher, dead_letters: LogWriter) -> None:
        while self._running():
            async with self._kafka_lock:
                msgs = await asyncio.to_thread(consumer.consume, 500, 0.2)
            for m in msgs:
                partition, offset = m.partition(), m.offset()
                self.tracker.seen(partition, offset)
                metrics.EVENTS_IN.labels(COMPONENT, ALERTS).inc()
                decoded = decode(m.value(), Alert)
                for rejected in decoded.rejected:
                    dl = DeadLetter.for_bytes(
                        rejected.raw,
                        f"invalid alert: {rejected.reason}",
                        source=consumer.topic,
                        partition=partition,
                        offset=offset,
                    )
                    await self._write_until_done(dead_letters, None, encode(dl))  # before the offset moves
                    metrics.DEAD_LETTERS.labels(COMPONENT, "invalid").inc()
                    log.warning("alert at %s[%d]@%d dead-lettered: %s", consumer.topic, partition, offset, rejected.reason)
                held = sum(dispatcher.apply(alert, (partition, offset)) for alert in decoded.valid)
                self.tracker.hold(partition, offset, held)

    async def _tick(self, dispatcher: Dispatcher, receivers: dict[str, Receiver], delivery_log: DeliveryLog) -> None:
        while self._running():
            for group in dispatcher.due():
                task = asyncio.create_task(self._flush(dispatcher, group, receivers, delivery_log))
                self._flushes.add(task)
                task.add_done_callback(self._flush_done)
            wait = dispatcher.next_due_in()
            await self._pause(min(0.1, wait) if wait is not None else 0.1)

    def _flush_done(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("flush failed", exc_info=task.exception())

    async def _flush(
        self, dispatcher: Dispatcher, group: Group, receivers: dict[str, Receiver], delivery_log: DeliveryLog
    ) -> None:
        flush: Flush = dispatcher.plan(group)
        try:
            record: DeliveryRecord | None = None
            n = flush.notification
            if n is not None:
                record = n.record
                if n.send:
                    gate = self._gates.setdefault(n.receiver, RateGate())
                    outcome = await deliver(
                        receivers[n.receiver],
                        n,
                        self.cfg.retry_initial_s,
                        self.cfg.retry_max_s,
                        gate,
                        self._pause,
                    )
                    if outcome.status == "aborted":
                        dispatcher.abandon(flush)
                        return
                    if outcome.status == "failed":
                        record = record.model_copy(update={"status": "failed", "error": outcome.error[:4000]})
                    else:
                        record = n.logged(outcome.handle)
                        log.info(
                            "notification %s delivered to %s (%s%d firing, %d resolved, %d attempts)",
                            n.notification_id, n.receiver, "update, " if n.update else "",
                            len(n.firing), len(n.resolved), outcome.attempts,
                        )
                if not await self._write_until_done(delivery_log.writer, record.group_id, encode(record)):
                    log.error(
                        "stopping before notification %s was logged: it may be sent again after a restart",
                        n.notification_id,
                    )
                    dispatcher.abandon(flush)
                    return
        except BaseException:
            dispatcher.abandon(flush)
            raise
        for partition, offset in dispatcher.complete(flush, record):
            self.tracker.release(partition, offset)

    async def _write_until_done(self, writer: LogWriter, key: str | None, value: bytes) -> bool:
        """Write, retrying while Kafka is unreachable; when stopping, try for a while only."""
        backoff = Backoff(self.cfg.retry_initial_s, self.cfg.retry_max_s)
        give_up_at: float | None = None
        while True:
            try:
                await writer.write(key, value)
                return True
            except LLMPulseError as exc:
                delay = backoff.next()
                log.warning("cannot write to %s (%s); retrying in %.1fs", writer.topic, exc, delay)
                if not self._running():
                    loop = asyncio.get_running_loop()
                    give_up_at = give_up_at or loop.time() + 10.0
                    if loop.time() > give_up_at:
                        return False
                    await asyncio.sleep(delay)
                else:
                    await self._pause(delay)

    async def _commit(self, consumer: AlertConsumer) -> None:
        offsets = self.tracker.committable()
        if not offsets:
            return
        async with self._kafka_lock:
            try:
                await asyncio.to_thread(consumer.commit, offsets)
            except Exception as exc:
                log.warning("offset commit failed (retried): %s", exc)
                return
        self.tracker.committed(offsets)

    async def _commit_loop(self, consumer: AlertConsumer) -> None:
        while await self._pause(self.cfg.commit_interval_s):
            await self._commit(consumer)

    async def _follow_silences(self, silences: SilenceTopic) -> None:
        while self._running():
            await asyncio.to_thread(silences.poll, 0.5)


def run_notifier(settings: Settings, *, bootstrap: str | None = None) -> None:
    """Run until SIGINT/SIGTERM (the blocking form of `Notifier.run`)."""
    notifier = Notifier(settings, bootstrap=bootstrap)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, notifier.stop)
        await notifier.run()

    asyncio.run(main())
