"""Stage 2: partials from every source partition -> final window aggregates -> rules -> alerts.

Input: messages of the internal `partials` topic (one per closed window of a source
partition, and close marks), a batch at a time per partials partition. Output, through
an `Emitter` (emitter.py): each window's final aggregate to `aggregates` once, under a
deterministic key (a revision when late events or a backfill change it), and the alerts
the rules raise on it to `alerts`. State: the finalizer's (finalizing.py, keys in
state_keys.py) and each dimension set's rule state, in a table whose changes are records
of its changelog (changelog_map.py), published through the same `Emitter` in bulk at the
end of each call that changed it. Nothing here imports Faust.

Contract (as arroyo's strategies state theirs):
- `submit(partition, messages)`: apply a batch of one partials partition, in offset
  order, past the state's applied offset and without a gap (contiguity.py); then publish
  the windows it completed and judge them. Returns once the aggregates and alerts are
  delivered; only then does the state say they were published (a crash before that
  publishes them again, under the same keys: readers keep the highest revision). Then
  the state's records are published and `submit` waits for their delivery too: the app
  commits the batch's offsets after `submit` returns, so the changelog holds the state
  that covers them.
- `poll()` (the timer): re-seek a partition left with an offset gap; resolve firing alerts
  of dimension sets whose traffic stopped (their alerts and state delivered before it returns).
- `revoke(partition)`: forget a partials partition (its state is restored by the next owner).
- `flush(partials)` (the embedded broker's exit only): close and publish everything now.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from llmpulse import metrics
from llmpulse.config import Settings
from llmpulse.kafka import topics as T
from llmpulse.schemas import WindowAggregate
from llmpulse.schemas.aggregate_wire import encode_aggregate
from llmpulse.schemas.codec import encode
from llmpulse.schemas.partials import decode_received
from llmpulse.streams import state_keys as SK
from llmpulse.streams.bulk_publish import Record
from llmpulse.streams.changelog_map import ChangelogMap
from llmpulse.streams.contiguity import OffsetGuard, Seek, admit_messages
from llmpulse.streams.emitter import Emitter
from llmpulse.streams.finalizing import Finalizer, StoredFinalizer, finalizer_partition
from llmpulse.streams.rules.engine import has_open_alerts
from llmpulse.streams.rules.hook import RulesHook as RulesHook  # the worker's type of its rules
from llmpulse.streams.rules.rootcause import WindowIndex, explain_window
from llmpulse.streams.windowing import Partial

log = logging.getLogger(__name__)

# partials partition -> its records read back from the table's changelog (restore.py), put
# in place of the table's records of that partition (ChangelogMap.load: nothing written)
LoadState = Callable[[int], Awaitable[dict[str, Any]]]


class FinalizeStage:
    def __init__(
        self,
        settings: Settings,
        emitter: Emitter,
        table: ChangelogMap,
        load_state: LoadState,
        seek: Seek,
        sources: dict[str, Iterable[str]],
        rules: RulesHook | None,
    ) -> None:
        kcfg = settings.kafka
        self.emitter = emitter
        self.table = table
        self.load_state = load_state
        self.seek = seek
        self.sources = sources
        self.rules = rules
        self.partitions = kcfg.partitions
        self.partials_topic = kcfg.topic(T.PARTIALS)
        self.aggregates_topic = kcfg.topic(T.AGGREGATES)
        self.alerts_topic = kcfg.topic(T.ALERTS)
        self.lock = asyncio.Lock()
        self.finalizers: dict[int, StoredFinalizer] = {}
        self.restored: set[int] = set()
        self.open_alerts: set[str] = set()  # rule-state keys with a firing alert
        self.guard = OffsetGuard()

    # -- the contract ---------------------------------------------------------------------------
    async def submit(self, fp: int, msgs: Sequence[Any]) -> None:
        """One batch of a partials partition, in offset order: applied, then what it completed published."""
        async with self.lock:
            stored = await self.finalizer_for(fp)
            msgs = await admit_messages(
                self.guard, ("partials", fp), stored.fin.applied, msgs, self.seek
            )
            if not msgs:
                return
            for msg in msgs:
                try:
                    stored.apply(decode_received(msg.value))
                except ValueError as exc:
                    log.error("unreadable partials message at %s/%s: %s", fp, msg.offset, exc)
            stored.commit(max(m.offset for m in msgs))  # admit_messages kept only offsets past it
            aggregates = stored.publishable()
            if aggregates:
                await self.publish(aggregates, fp)  # delivered before the state says so
            stored.published()
            stored.expire()
            await self._write_state()

    async def poll(self) -> None:
        """The timer: re-seek gaps; resolve firing alerts of dimension sets whose traffic stopped."""
        async with self.lock:
            for key, offset in self.guard.due_reseeks(time.monotonic()):
                assert isinstance(key, tuple)
                log.info(
                    "%s[%d]: offset %d has not arrived yet; seeking to it again",
                    self.partials_topic,
                    key[1],
                    offset,
                )
                await self.seek(self.partials_topic, key[1], offset)
            await self._sweep_quiet()
            await self._write_state()

    def revoke(self, fp: int) -> None:
        self.finalizers.pop(fp, None)
        self.guard.forget(("partials", fp))

    def forget_restored(self, fp: int) -> None:
        """The table's partition was revoked: read it again from its changelog when next needed."""
        self.restored.discard(fp)

    async def flush(self, partials: Iterable[Partial]) -> None:
        """Close every open window now and publish it (the embedded broker keeps no state)."""
        async with self.lock:
            combined = Finalizer(self.sources)
            for stored in self.finalizers.values():
                combined.windows.update(stored.fin.windows)
                combined.unpublished |= stored.fin.unpublished
            for p in partials:
                combined.add_partial(p)
            for kind, sources in self.sources.items():
                for src in sources:
                    combined.set_mark(kind, src, int(math.ldexp(1, 60)))
            ready = combined.ready()
            log.info("flushing %d open windows on exit", len(ready))
            # judged against the rule state of the finalizer that owns each window size, as
            # `submit` would have: partition 0's holds other sizes' (or nothing)
            by_owner: dict[int, list[WindowAggregate]] = {}
            for _, agg in ready:
                by_owner.setdefault(
                    finalizer_partition(agg.kind, agg.window_s, self.partitions), []
                ).append(agg)
            for fp, aggs in sorted(by_owner.items()):
                await self.publish(aggs, fp)
            await self._write_state()

    # -- state --------------------------------------------------------------------------------------
    async def finalizer_for(self, fp: int) -> StoredFinalizer:
        stored = self.finalizers.get(fp)
        if stored is not None:
            return stored
        if fp not in self.restored:
            state = await self.load_state(fp)
            self.table.load(fp, state)
            for k, v in state.items():
                if (p := SK.parse(k)) is not None and p.shape == "R" and has_open_alerts(v):
                    self.open_alerts.add(k)
            self.restored.add(fp)
        self.finalizers[fp] = stored = StoredFinalizer.restore(fp, self.sources, self.table)
        return stored

    async def _write_state(self) -> None:
        """The table's changes since the last call published in bulk, in order, and delivered."""
        futures = await self.table.flush(self.emitter.publish)
        if futures:
            await asyncio.gather(*futures)

    # -- publishing ---------------------------------------------------------------------------------
    async def publish(self, aggregates: Iterable[WindowAggregate], fp: int) -> None:
        """Publish final aggregates and judge them; return once all is delivered.

        The aggregates go out in bulk (bulk_publish.py: one batch per partition, placed by
        key as one send each would be), the rules judge them in one call (a window's
        aggregates together, each dimension set's windows in window order: the same verdicts
        as one aggregate at a time), and each dimension set's rule state is written once per call, after
        its last window, not once per window: a replay hands this hundreds of windows of
        the same sets at once (the state is plain data the engine mutates in place; a
        crash before the write re-judges those windows, and an alert's id is deterministic)."""
        futures: list[Any] = []
        now = time.time()
        aggregates = list(aggregates)
        records: list[Record] = [(None, agg.aggregate_id.encode(), encode_aggregate(agg)) for agg in aggregates]
        closed: dict[str, int] = {}
        observe = metrics.WINDOW_CLOSE_DELAY.observe
        for agg in aggregates:
            closed[agg.kind] = closed.get(agg.kind, 0) + 1
            observe(max(0.0, now - agg.window_end.timestamp()))
        for kind, n in closed.items():
            metrics.WINDOWS_CLOSED.labels(kind).inc(n)
        window_of: dict[tuple[str, int, datetime], list[WindowAggregate]] = {}  # built for a first alert
        judged: dict[str, dict[str, Any]] = {}  # rule-state key -> its state, written after delivery
        if self.rules is not None:

            def rule_key(agg: WindowAggregate) -> str:
                return SK.rule_key(fp, agg.kind, agg.window_s, agg.dims_key)

            # in bulk: each window's aggregates judged together (RulesEngine.judge)
            verdicts = self.rules.judge(
                [agg for agg in aggregates if agg.revision == 1],
                lambda agg: self.table.get(rule_key(agg)),
            )
            index_of: dict[tuple[str, int, datetime], WindowIndex] = {}  # one per window, not per alert
            for agg, alerts, state in verdicts:
                judged[rule_key(agg)] = state
                if not alerts:
                    continue
                # root cause: which finer dimension of this window drives the deviation
                window = (agg.kind, agg.window_s, agg.window_start)
                if not window_of:
                    for each in aggregates:
                        window_of.setdefault((each.kind, each.window_s, each.window_start), []).append(each)
                if window not in index_of:
                    index_of[window] = WindowIndex(window_of[window])
                for alert in explain_window(index_of[window], alerts):
                    metrics.ALERTS_PUBLISHED.labels(alert.severity, alert.state).inc()
                    futures.append(
                        await self.emitter.send(
                            self.alerts_topic, alert.fingerprint.encode(), encode(alert)
                        )
                    )
        futures += await self.emitter.publish(self.aggregates_topic, records)
        for rkey, state in judged.items():
            self.table[rkey] = state
            if has_open_alerts(state):
                self.open_alerts.add(rkey)
            else:
                self.open_alerts.discard(rkey)
        if futures:
            await asyncio.gather(*futures)

    async def _sweep_quiet(self) -> None:
        """Resolve firing alerts of dimension sets whose traffic stopped (no windows, no verdicts).

        The clock is the finalizer's event time for the kind, so the outcome does not depend
        on when the sweep runs."""
        sweep = getattr(self.rules, "sweep", None)
        if sweep is None or not self.open_alerts:
            return
        futures = []
        for rkey in list(self.open_alerts):
            parsed = SK.parse(rkey)
            assert parsed is not None
            stored = self.finalizers.get(parsed.partition)
            fin = None if stored is None else stored.fin
            state = self.table.get(rkey)
            if fin is None or state is None or parsed.kind not in fin.finalized:
                continue
            now = datetime.fromtimestamp(fin.finalized[parsed.kind] / 1000, tz=UTC)
            for alert in sweep(state, now):
                metrics.ALERTS_PUBLISHED.labels(alert.severity, alert.state).inc()
                futures.append(
                    await self.emitter.send(
                        self.alerts_topic, alert.fingerprint.encode(), encode(alert)
                    )
                )
            self.table[rkey] = state
            if not has_open_alerts(state):
                self.open_alerts.discard(rkey)
        if futures:
            await asyncio.gather(*futures)
