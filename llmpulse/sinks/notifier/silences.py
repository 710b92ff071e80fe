"""Silences: mute matching alerts until they expire.

They live in the compacted internal topic `silences`, keyed by silence id, so every
notifier (and every `llmpulse silence list`) sees the same set. Expiring a silence
rewrites it with `ends_at` set to now; it stays listed with `--all`.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from typing import Any

from llmpulse.config import Settings
from llmpulse.errors import LLMPulseError
from llmpulse.kafka.bootstrap import resolve_bootstrap
from llmpulse.kafka.clients import consumer_settings, producer_settings
from llmpulse.kafka.topics import SILENCES
from llmpulse.schemas.alert import Alert
from llmpulse.schemas.base import utc_now
from llmpulse.schemas.codec import decode_one, encode
from llmpulse.sinks.notifier.logtopic import LogReader, LogWriter
from llmpulse.sinks.notifier.models import Silence

log = logging.getLogger(__name__)


class SilenceStore:
    """The silences seen on the topic (thread-safe: a follower thread updates it)."""

    def __init__(self) -> None:
        self._silences: dict[str, Silence] = {}
        self._lock = threading.Lock()

    def apply(self, key: str, value: bytes | None) -> None:
        with self._lock:
            if value is None:
                self._silences.pop(key, None)
                return
            try:
                silence = decode_one(value, Silence)
            except ValueError as exc:
                log.warning("ignoring an invalid silence record %r: %s", key, exc)
                return
            self._silences[silence.silence_id] = silence

    def all(self) -> list[Silence]:
        with self._lock:
            return sorted(self._silences.values(), key=lambda s: (s.ends_at, s.silence_id))

    def get(self, silence_id: str) -> Silence | None:
        with self._lock:
            return self._silences.get(silence_id)

    def silenced_by(self, alert: Alert, now: datetime | None = None) -> Silence | None:
        at = now or utc_now()
        with self._lock:
            for s in self._silences.values():
                if s.active(at) and s.matches(alert):
                    return s
        return None


class SilenceTopic:
    """Read and write the silences topic of one deployment."""

    def __init__(self, settings: Settings, bootstrap: str | None = None) -> None:
        self.bootstrap = bootstrap or resolve_bootstrap(settings)
        topic = settings.kafka.topic(SILENCES)
        self.writer = LogWriter(producer_settings(self.bootstrap, settings.kafka), topic)
        self.reader = LogReader(consumer_settings(self.bootstrap, settings.kafka, "unused"), self.writer)
        self.store = SilenceStore()

    def load(self, timeout: float = 60.0) -> SilenceStore:
        self.reader.read_to_end(self.store.apply, timeout)
        return self.store

    def poll(self, timeout: float = 0.2) -> None:
        self.reader.poll(self.store.apply, timeout)

    def put(self, silence: Silence) -> None:
        self.writer.write_sync(silence.silence_id, encode(silence))
        self.store.apply(silence.silence_id, encode(silence))

    def close(self) -> None:
        self.reader.close()
        self.writer.close()

    def __enter__(self) -> SilenceTopic:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def add_silence(
    settings: Settings,
    *,
    duration: timedelta,
    rule: str | None = None,
    dimensions: dict[str, str] | None = None,
    comment: str = "",
    created_by: str = "",
    bootstrap: str | None = None,
) -> Silence:
    if rule is None and not dimensions:
        raise LLMPulseError("a silence needs a rule or at least one dimension (it would mute everything)")
    if duration <= timedelta(0):
        raise LLMPulseError("a silence needs a positive duration")
    now = utc_now()
    silence = Silence(
        rule=rule,
        dimensions=dimensions or {},
        starts_at=now,
        ends_at=now + duration,
        comment=comment,
        created_by=created_by,
    )
    with SilenceTopic(settings, bootstrap) as topic:
        topic.put(silence)
    return silence


def list_silences(settings: Settings, *, include_expired: bool = False, bootstrap: str | None = None) -> list[Silence]:
    with SilenceTopic(settings, bootstrap) as topic:
        silences = topic.load().all()
    now = utc_now()
    return [s for s in silences if include_expired or s.ends_at > now]


def expire_silence(settings: Settings, silence_id: str, *, bootstrap: str | None = None) -> Silence:
    with SilenceTopic(settings, bootstrap) as topic:
        store = topic.load()
        found = store.get(silence_id)
        if found is None:
            raise LLMPulseError(f"no silence with id {silence_id!r} (see `llmpulse silence list --all`)")
        now = utc_now()
        if found.ends_at <= now:
            return found
        expired = found.model_copy(update={"ends_at": max(now, found.starts_at)})
        topic.put(expired)
    return expired
