"""The Faust app of `llmpulse worker`: the one file of streams/ that knows Faust.

It wires two stages, each with its own contract and unit tests against an in-memory
emitter (emitter.py):

    source topics --(source_reader.py, bulk)--> WindowStage (window_stage.py)
        --partials topic--> Faust agent `finalize` --> FinalizeStage (finalize_stage.py)
        --> aggregates topic, alerts topic

Stage 1 reads calls, GPU samples, feedback and host samples in bulk with its own
consumer (source_reader.py: why, and what is committed after what), keeps event-time
windows per source partition and publishes, for each closed window, one message holding
all its dimension sets to the internal `partials` topic, keyed by kind and window size
(so every dimension set of a window meets in one finalizer, which lets an alert on the
global set name the model or key behind it), then the partition's close mark to every
partials partition. Stage 2 merges the partials of all source partitions, publishes
each final window once to `aggregates` under a deterministic key and runs the rules,
publishing alerts.

All state lives in changelogs whose keys carry their partition, so a restarted or
rebalanced worker recovers exactly what it owned: stage 1's is written straight to its
changelog partition (changelog_state.py), stage 2's too (changelog_map.py, the topic and
record format its Faust table used, so an older worker's state restores unchanged), each
in bulk. Faust tables are not used: their per-write producer path cost stage 2 more than
its work on sparse traffic, and Faust's windowed tables close on wall-clock time
(faust-streaming #250, PR #758).

What this adapter adds to the stages: the Faust app and its settings, an `Emitter` over
the app's producer, reading a changelog partition back (restore.py), the timer, the
rebalance callbacks and the clean stop (the state as it was, then, with the embedded
broker, every open window closed and published).

Faust's consumer (partials) asks the broker to hold a fetch
that finds nothing new for 1,500 ms, hard-coded in its aiokafka driver, and a partials
message that arrives meanwhile waits for it: at the end of a 200,000-event backlog the
finalizer received the last partials 0.85 s after they were sent. The timer gives that
consumer's fetcher the source reader's wait (source_reader.FETCH_MAX_WAIT_MS): 0.2 s then.
It changes when records are fetched, not which.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

import faust
from faust.types import TP

from llmpulse.config import Settings
from llmpulse.kafka import topics as T
from llmpulse.streams.bulk_publish import Record, publish_bulk
from llmpulse.streams.changelog_map import ChangelogMap
from llmpulse.streams.credentials import aiokafka_security, faust_credentials
from llmpulse.streams.finalize_stage import FinalizeStage, RulesHook
from llmpulse.streams.restore import read_changelog_partition
from llmpulse.streams.source_reader import FETCH_MAX_WAIT_MS, SourceReader
from llmpulse.streams.window_stage import KINDS, WindowStage, call_dimensions, sources_of

log = logging.getLogger(__name__)


class FaustEmitter:
    """The stages' Emitter over the Faust app's producer.

    One record: Faust's topic send. Many: one aiokafka record batch per partition
    (bulk_publish.py). Both go through the one aiokafka producer under Faust's, whose
    queue per partition is first in, first out: records of a partition stay in call order."""

    def __init__(self, app: faust.App) -> None:
        self.app = app
        self.topics: dict[str, Any] = {}

    async def send(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None
    ) -> Awaitable[Any]:
        t = self.topics.get(topic)
        if t is None:
            t = self.topics[topic] = self.app.topic(
                topic, key_serializer="raw", value_serializer="raw"
            )
        return await t.send(key=key, value=value, partition=partition)  # type: ignore[no-any-return]

    async def publish(self, topic: str, records: list[Record]) -> list[Awaitable[Any]]:
        # the aiokafka producer under Faust's: its record batches, not Faust's per-message send
        return await publish_bulk(self.app.producer._ensure_producer(), topic, records)  # type: ignore[attr-defined]


class WorkerRuntime:
    def __init__(self, settings: Settings, bootstrap: str, rules: RulesHook | None = None) -> None:
        self.settings = settings
        kcfg = settings.kafka
        wcfg = settings.worker
        self.bootstrap = bootstrap
        self.security = T.client_security(kcfg)
        self.app = faust.App(
            f"{kcfg.topic_prefix}worker",
            broker=[f"kafka://{b}" for b in bootstrap.split(",")],
            broker_credentials=faust_credentials(self.security),
            store="memory://",
            topic_partitions=kcfg.partitions,
            topic_replication_factor=kcfg.replication_factor,
            broker_session_timeout=kcfg.session_timeout_ms / 1000,
            broker_heartbeat_interval=max(0.5, kcfg.session_timeout_ms / 6000),
            broker_commit_interval=1.0,
            consumer_auto_offset_reset="earliest",
            web_enabled=False,
            table_standby_replicas=0,
            producer_linger_ms=5,
            producer_max_batch_size=1_000_000,
            producer_max_request_size=10_000_000,
            consumer_max_fetch_size=10_000_000,
            stream_buffer_maxsize=max(4096, wcfg.batch_max_messages * 2),
        )
        # Faust stops feeding the streams while more than `max_messages` (100) records wait
        # in its producer buffer; one batch may send hundreds of dead letters through it
        self.app.producer.buffer.max_messages = 100_000
        self.partials_topic = self.app.topic(
            kcfg.topic(T.PARTIALS), key_serializer="raw", value_serializer="raw"
        )
        # stage 2's state: the changelog topic its Faust table "final" had (state_keys.py)
        self.final_table = ChangelogMap(f"{self.app.conf.id}-final-changelog")
        self.flush_on_exit = wcfg.flush_open_windows_on_exit
        emitter = FaustEmitter(self.app)
        self.reader = SourceReader(
            bootstrap, f"{self.app.conf.id}-sources", [kcfg.topic(t) for t in KINDS],
            aiokafka_security(self.security), self._submit_sources, self._revoke_sources,
            self._assign_sources, self._source_start, max_records=wcfg.batch_max_messages,
            session_timeout_ms=kcfg.session_timeout_ms, poll_ms=max(1, round(wcfg.batch_within_s * 1000)),
            held=lambda: self.windows.held(),
        )  # fmt: skip
        self.windows = WindowStage(
            settings,
            emitter,
            self.reader,
            self._read_changelog,
            f"{self.app.conf.id}-windows-changelog",
            call_dimensions(settings, rules),
        )
        self.finalize = FinalizeStage(
            settings, emitter, self.final_table, self._load_final, self._seek_partials,
            sources_of(kcfg.partitions), rules,
        )  # fmt: skip
        # their topics are created compacted by `llmpulse worker`
        self.changelogs = [self.windows.table.topic, self.final_table.topic]
        self._wire()

    # -- wiring ---------------------------------------------------------------------------------
    def _wire(self) -> None:
        app = self.app
        partials = self.partials_topic.get_topic_name()

        @app.task  # type: ignore[untyped-decorator]
        async def read_sources() -> None:
            await self.reader.run()

        @app.agent(self.partials_topic, name="finalize")
        async def finalize_agent(stream: Any) -> None:
            async for events in stream.take_events(5000, within=0.2):
                await asyncio.shield(self._submit_partials(events))

        @app.timer(interval=1.0)  # type: ignore[untyped-decorator]
        async def tick() -> None:
            self._shorten_partials_long_poll()
            if not self.reader.ready:
                self.windows.pause()  # no idle closing while paused for a rebalance or a recovery
            else:
                futures, offsets = await self.windows.poll()
                self.reader.ledger.add(futures, offsets)
            if self._ready():
                await self.finalize.poll()

        @app.on_partitions_revoked.connect  # type: ignore[arg-type]
        async def on_revoked(app: Any, revoked: set[Any], **_: Any) -> None:
            for tp in revoked:
                if tp.topic == partials:
                    self.finalize.forget_restored(tp.partition)
                    self.finalize.revoke(tp.partition)

        @app.on_before_shutdown.connect  # type: ignore[arg-type]
        async def on_shutdown(app: Any, **_: Any) -> None:
            await self.reader.halt()
            await self.windows.join()  # the state as it was before the exit flush closes anything
            if self.flush_on_exit:
                await self.finalize.flush(self.windows.close_all())
            await self.reader.stop()

    def _shorten_partials_long_poll(self) -> None:
        """Faust's consumer fetcher, once started, holds an empty fetch no longer than the
        source reader's (module docstring). Faust exposes no setting for it: the aiokafka
        fetcher reads the attribute for each fetch it sends; an int set from this thread."""
        consumer: Any = getattr(getattr(self.app.consumer, "_thread", None), "_consumer", None)
        fetcher: Any = getattr(consumer, "_fetcher", None)
        if fetcher is not None and fetcher._fetch_max_wait_ms != FETCH_MAX_WAIT_MS:
            consumer._fetch_max_wait_ms = fetcher._fetch_max_wait_ms = FETCH_MAX_WAIT_MS

    def _ready(self) -> bool:
        app = self.app
        try:
            recovered = app.tables.recovery.completed.is_set()  # type: ignore[attr-defined]
        except AttributeError:  # pragma: no cover
            recovered = True
        return bool(recovered and not app.rebalancing)

    # -- stage 1's input (source_reader.py) ------------------------------------------------------
    async def _submit_sources(
        self, records: dict[tuple[str, int], Any]
    ) -> tuple[list[Any], dict[tuple[str, int], int]]:
        return await self.windows.submit(records)

    async def _assign_sources(self, assigned: set[tuple[str, int]]) -> None:
        await self.windows.assign(assigned)

    async def _revoke_sources(self, revoked: set[tuple[str, int]]) -> list[Any]:
        return await self.windows.revoke(revoked)

    async def _source_start(self, tp: tuple[str, int]) -> int | None:
        return await self.windows.start_offset(tp)

    # -- stage 2's input (the Faust agent) -------------------------------------------------------
    async def _submit_partials(self, events: Any) -> None:
        by_partition: dict[int, list[Any]] = {}
        for ev in events:
            by_partition.setdefault(ev.message.partition, []).append(ev.message)
        for fp, msgs in by_partition.items():
            await self.finalize.submit(fp, msgs)

    async def _seek_partials(self, topic: str, partition: int, offset: int) -> None:
        try:
            await self.app.consumer.seek(TP(topic, partition), offset)
        except Exception as exc:  # revoked meanwhile: the next owner starts from its state
            log.warning("could not seek %s[%d] to %d: %s", topic, partition, offset, exc)

    # -- state read back from a changelog (restore.py) -------------------------------------------
    async def _read_changelog(self, topic: str, partition: int) -> dict[str, Any]:
        return await asyncio.to_thread(
            read_changelog_partition, self.bootstrap, topic, partition, self.security
        )

    async def _load_final(self, fp: int) -> dict[str, Any]:
        """Stage 2's state of partials partition `fp`, read back from its changelog."""
        return await self._read_changelog(self.final_table.topic, fp)
