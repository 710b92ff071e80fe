"""Action state from the compacted `actions` topic: any process can follow it.

Each step of an action is one message keyed ``<action_id>:<status>`` (so compaction
keeps every step, and the ClickHouse sink sees each one); the current state of an
action is its step of highest rank (`model.RANK`). Readers:

    with ActionTopic(settings) as topic:
        store = topic.load()              # everything written before this call
        store.active()                    # applied, not expired
        topic.publish(ev)                 # write a step (acknowledged) and apply it

    follower = ActionFollower(settings, on_change=lambda store: ...)
    follower.start()                      # a daemon thread following the topic
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from llmpulse.actions.model import LIVE, RANK
from llmpulse.config import Settings
from llmpulse.kafka.bootstrap import resolve_bootstrap
from llmpulse.kafka.clients import consumer_settings, producer_settings
from llmpulse.kafka.topics import ACTIONS
from llmpulse.schemas.action import ActionEvent
from llmpulse.schemas.base import utc_now
from llmpulse.schemas.codec import decode_one, encode

log = logging.getLogger(__name__)


class ActionStore:
    """The latest step of every action (thread-safe)."""

    def __init__(self) -> None:
        self._actions: dict[str, ActionEvent] = {}
        self._lock = threading.Lock()
        self.version = 0

    def apply(self, key: str, value: bytes | None) -> None:
        """Take one message of the topic (a LogReader handler)."""
        self.take(key, value)

    def take(self, key: str, value: bytes | None) -> bool:
        """Take one message of the topic; True when it changed an action's state."""
        if value is None:
            return False  # tombstones and read barriers
        try:
            ev = decode_one(value, ActionEvent)
        except ValueError as exc:
            log.warning("ignoring an invalid action record %r: %s", key, exc)
            return False
        return self.put(ev)

    def put(self, ev: ActionEvent) -> bool:
        with self._lock:
            cur = self._actions.get(ev.action_id)
            if cur is not None and (RANK[cur.status], cur.ts) >= (RANK[ev.status], ev.ts):
                return False
            self._actions[ev.action_id] = ev
            self.version += 1
            return True

    def get(self, action_id: str) -> ActionEvent | None:
        with self._lock:
            return self._actions.get(action_id)

    def find(self, prefix: str) -> list[ActionEvent]:
        """Actions whose id starts with `prefix` (ids may be given shortened)."""
        with self._lock:
            exact = self._actions.get(prefix)
            if exact is not None:
                return [exact]
            return [a for k, a in self._actions.items() if k.startswith(prefix)]

    def all(self) -> list[ActionEvent]:
        with self._lock:
            return sorted(self._actions.values(), key=lambda a: (a.ts, a.action_id))

    def live(self) -> list[ActionEvent]:
        """Proposed, pending, approved or applied."""
        return [a for a in self.all() if a.status in LIVE]

    def active(self, now: datetime | None = None) -> list[ActionEvent]:
        """Applied and not past their expiry: what the proxies enforce."""
        at = now or utc_now()
        return [a for a in self.all() if a.status == "applied" and (a.expires_at is None or a.expires_at > at)]

    def pending(self, now: datetime | None = None) -> list[ActionEvent]:
        at = now or utc_now()
        return [a for a in self.all() if a.status == "pending" and (a.expires_at is None or a.expires_at > at)]


class ActionTopic:
    """Read and write the actions topic of one deployment."""

    def __init__(self, settings: Settings, bootstrap: str | None = None) -> None:
        from llmpulse.sinks.notifier.logtopic import LogReader, LogWriter

        self.bootstrap = bootstrap or resolve_bootstrap(settings)
        self.topic = settings.kafka.topic(ACTIONS)
        self.writer = LogWriter(producer_settings(self.bootstrap, settings.kafka), self.topic)
        self.reader = LogReader(consumer_settings(self.bootstrap, settings.kafka, "unused"), self.writer)
        self.store = ActionStore()

    def load(self, timeout: float = 60.0) -> ActionStore:
        """Read every step written before this call (a read barrier, not watermarks)."""
        self.reader.read_to_end(self.store.apply, timeout)
        return self.store

    def poll(self, timeout: float = 0.2) -> bool:
        """Take steps that arrived since the last call; True when some state changed."""
        before = self.store.version
        self.reader.poll(self.store.apply, timeout)
        return self.store.version != before

    def publish(self, ev: ActionEvent) -> None:
        """Write one step (returns once Kafka acknowledged it) and apply it locally."""
        self.writer.write_sync(ev.event_id, encode(ev))
        self.store.put(ev)

    def close(self) -> None:
        self.reader.close()
        self.writer.close()

    def __enter__(self) -> ActionTopic:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


class ActionFollower:
    """Follows the actions topic in a daemon thread; `on_change(store)` after each change.

    Reads from the beginning without a consumer group (no rebalance wait), so a
    process that starts knows the active actions within a poll or two.
    """

    def __init__(
        self,
        settings: Settings,
        on_change: Callable[[ActionStore], None] | None = None,
        bootstrap: str | None = None,
        poll_s: float = 0.2,
    ) -> None:
        self.settings = settings
        self.on_change = on_change
        self._bootstrap = bootstrap
        self.poll_s = poll_s
        self.store = ActionStore()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()
        self.error: str | None = None

    def start(self) -> ActionFollower:
        self._thread = threading.Thread(target=self._run, name="llmpulse-actions-follower", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

        from llmpulse.sinks.notifier.logtopic import partitions_of

        try:
            bootstrap = self._bootstrap or resolve_bootstrap(self.settings)
            conf = consumer_settings(bootstrap, self.settings.kafka, "unused")
            conf["group.id"] = f"llmpulse-actions-follower-{id(self):x}"
            consumer = Consumer(conf)
            topic = self.settings.kafka.topic(ACTIONS)
            parts = partitions_of(consumer, topic, timeout=30)
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        except Exception as exc:  # the proxy keeps serving without actions
            self.error = str(exc)
            log.error("cannot follow the actions topic: %s", exc)
            self.ready.set()
            return
        try:
            first = True
            while not self._stop.is_set():
                changed = False
                for m in consumer.consume(10_000, self.poll_s):
                    err = m.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            log.warning("actions topic: %s", err)
                        continue
                    raw_key = m.key()
                    key = raw_key.decode("utf-8", "replace") if raw_key is not None else ""
                    changed |= self.store.take(key, m.value())
                if (changed or first) and self.on_change is not None:
                    try:
                        self.on_change(self.store)
                    except Exception:
                        log.exception("applying the actions state failed")
                if first:
                    first = False
                    self.ready.set()
        finally:
            consumer.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
