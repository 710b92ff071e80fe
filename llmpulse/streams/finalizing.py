"""Merge window partials from every source partition into final window aggregates.

A window of one kind is final once every source partition of that kind has reported a
close mark, and every one with data a mark at or past the window's end: then all
partials are in. Partials are kept per source, so a partial re-sent after a crash
replaces its earlier copy instead of adding to it. A source that has sent no mark holds
every window back (`complete_through` is None). A source whose mark is EMPTY (stage 1
declared its partition empty: no event, at its end for `worker.idle_close_s` since it
was assigned, window_stage.py) does not hold the others back; if it later brings data
for a window already finalized (a backfill of old events), the window is kept for a
while after finalizing and published again, under the same key with a higher revision,
so the stored aggregate converges to the truth.
Late events a partition counted after closing their window arrive the same way, as the
part of source `<source>~late` (windowing.py, cumulative); such a source sends no close
mark and is never waited for (`complete_through` reads only `sources`).

State is held, and written, per window: one message of a source (all its dimension sets
of the window, llmpulse.schemas.partials) is one state write, and a window's publication
one more, whatever the number of its dimension values (issue 15).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from llmpulse.config.worker import FINALIZED_RETENTION_S
from llmpulse.schemas.aggregate import WindowAggregate
from llmpulse.schemas.partials import (
    CloseMark,
    DimensionSetState,
    ReceivedPartials,
    WindowPartials,
    decode_received_sets,
    encode_sets,
    pack_state,
    unpack_state,
)
from llmpulse.streams import state_keys as SK
from llmpulse.streams.accumulators import WindowResults
from llmpulse.streams.bulk_publish import default_partition
from llmpulse.streams.state_keys import StateKey
from llmpulse.streams.windowing import Partial

log = logging.getLogger(__name__)

PendingKey = tuple[str, int, int, str]  # kind, window_s, start_ms, dims_key
WindowKey = tuple[str, int, int]  # kind, window_s, start_ms


@dataclass(slots=True)
class Pending:
    """One dimension set of a window: its partials by source, and its publication.

    A part is an accumulator state, packed (its JSON bytes, schemas.partials.pack_state) as
    it arrived in its message: it is decoded once, when the set is published (a decoded
    state is 2 KB of dicts against 350 bytes packed, and a window is kept for the whole
    backfill retention, 15 min; decoding each on receipt cost stage 2 more than merging)."""

    dims: dict[str, str]
    parts: dict[str, bytes] = field(default_factory=dict)
    revision: int = 0  # > 0 once published; each re-publication increments it

    def to_json(self) -> dict[str, Any]:
        parts = {src: unpack_state(st) for src, st in self.parts.items()}
        return {"dims": self.dims, "parts": parts, "rev": self.revision}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Pending:
        parts = {src: pack_state(st) for src, st in d["parts"].items()}
        return cls(d["dims"], parts, d.get("rev", 0))


def _changed(held: bytes, state: bytes) -> bool:
    """Whether a part received again differs from the one held: the same text, or the same
    values written otherwise (e.g. a state's dict keys in another order after a restore)."""
    return held != state and unpack_state(held) != unpack_state(state)


def _by_source(parts: dict[str, bytes]) -> Iterable[bytes]:
    """A dimension set's parts in the order of their sources' names, not the order they arrived:
    the float sums (latency, TTFT) and the error types' order of a merge depend on its order,
    and arrival order depends on timing (which partition's partials a fetch returned first), so
    the same events gave aggregates differing in a sum's last bit from one run, restart or
    rebalance to the next. Most sets have one part: nothing to order."""
    return parts.values() if len(parts) < 2 else [parts[source] for source in sorted(parts)]


@dataclass(slots=True)
class PendingWindow:
    """Every dimension set of one window, and what of it is in the state (for removal)."""

    sets: dict[str, Pending] = field(default_factory=dict)
    chunks: dict[str, int] = field(default_factory=dict)  # source -> chunks of its largest send
    legacy: set[str] = field(default_factory=set)  # dims keys stored by the previous version
    published: bool = False  # some set was published
    # its revisions are in the state (a `V` value); without one they follow from the
    # finalized mark: every set 1 when the window ended by then, else 0
    stored: bool = False

    def revisions(self) -> dict[str, Any]:
        """Its revisions as stored: those other than 1."""
        return {"x": {dk: p.revision for dk, p in self.sets.items() if p.revision != 1}}

    def restore_revisions(self, value: dict[str, Any]) -> None:
        other = value.get("x") or {}
        for dk, p in self.sets.items():
            p.revision = int(other.get(dk, 1))


def partial_key(kind: str, window_s: int) -> bytes:
    """The key of a window size's partials: every dimension set of a window meets in one finalizer."""
    return f"{kind}|{window_s}".encode()


def finalizer_partition(kind: str, window_s: int, partitions: int) -> int:
    """The partials partition (and so the finalizer state, rule state included) of a window size.

    Kafka's default partitioner (murmur2 of the key), which placed partials before they
    were sent to an explicit partition: a deployment's state stays where it was."""
    return default_partition(partial_key(kind, window_s), partitions)


EMPTY = -(2**62)  # the close mark of a source declared empty (no event, idle since assigned)
RETAIN_MS = round(FINALIZED_RETENTION_S * 1000)  # how long a finalized window accepts a backfilled partial


class Finalizer:
    def __init__(self, sources: Mapping[str, Iterable[str]]) -> None:
        self.sources = {kind: set(srcs) for kind, srcs in sources.items()}
        self.windows: dict[WindowKey, PendingWindow] = {}
        self.unpublished: set[WindowKey] = set()  # windows holding a set to (re)publish
        self.revised: set[WindowKey] = set()
        self.marks: dict[str, dict[str, int]] = {kind: {} for kind in self.sources}
        self.finalized: dict[str, int] = {}
        self.stale = 0
        self.applied: int | None = None  # the last partials offset this state holds

    def add(self, msg: WindowPartials | ReceivedPartials) -> WindowKey | None:
        """Keep a window's partials of one source; None when the window is past the backfill
        retention (counted). A source's partial of a dimension set replaces its earlier copy."""
        if msg.end_ms <= self.finalized.get(msg.kind, EMPTY) - RETAIN_MS:
            self.stale += 1
            log.warning(
                "partial of %s %ss window %s from %s arrived %d s after the window was final; "
                "the raw events are stored, the window's aggregate keeps its published figures",
                msg.kind, msg.window_s, msg.start_ms, msg.source, (self.finalized[msg.kind] - msg.end_ms) // 1000,
            )  # fmt: skip
            return None
        wkey = (msg.kind, msg.window_s, msg.start_ms)
        window = self.windows.get(wkey)
        if window is None:
            window = self.windows[wkey] = PendingWindow()
            if msg.end_ms <= self.finalized.get(msg.kind, EMPTY):
                self.revised.add(wkey)  # the finalized mark would say it was published: store its revisions
        sets = window.sets
        for entry in msg.sets:
            slot = sets.get(entry.dims_key)
            if slot is None:
                slot = sets[entry.dims_key] = Pending(entry.dims)
                if window.published:
                    self.revised.add(wkey)  # a set the stored revisions do not know (revision 0)
            state = entry.state
            packed = pack_state(state) if isinstance(state, dict) else bytes(state)
            held = slot.parts.get(msg.source)
            if held is None or _changed(held, packed):
                slot.parts[msg.source] = packed
                if slot.revision > 0:
                    slot.revision = -slot.revision  # published before: publish again
                    self.revised.add(wkey)
                if slot.revision <= 0:
                    self.unpublished.add(wkey)
        return wkey

    def take_revised(self) -> list[WindowKey]:
        """Published windows whose revisions changed since the last call (their state to write)."""
        out = [w for w in self.revised if w in self.windows]
        self.revised.clear()
        return out

    def add_partial(self, p: Partial) -> PendingKey | None:
        """One dimension set of one window (see `add`)."""
        msg = WindowPartials(
            kind=p.kind, window_s=p.window_s, start_ms=p.start_ms, source=p.source, chunk=-1, chunks=0,
            sets=[DimensionSetState(p.dims_key, p.dims, p.state)],
        )  # fmt: skip
        return None if self.add(msg) is None else (p.kind, p.window_s, p.start_ms, p.dims_key)

    @property
    def pending(self) -> dict[PendingKey, Pending]:
        """Every dimension set held, by (kind, window_s, start_ms, dims_key) (a view for reading)."""
        return {(*w, dk): p for w, window in self.windows.items() for dk, p in window.sets.items()}

    def set_mark(self, kind: str, source: str, mark: int | None) -> None:
        marks = self.marks.setdefault(kind, {})
        value = EMPTY if mark is None else mark
        if value > marks.get(source, EMPTY - 1):
            marks[source] = value

    def complete_through(self, kind: str) -> int | None:
        expected = self.sources.get(kind)
        marks = self.marks.get(kind, {})
        if not expected or any(s not in marks for s in expected):
            return None
        with_data = [marks[s] for s in expected if marks[s] != EMPTY]
        return min(with_data) if with_data else None

    def ready_windows(self) -> list[tuple[WindowKey, list[tuple[PendingKey, WindowAggregate]]]]:
        """Per window, its aggregates to publish: complete windows (revision 1) and the
        backfilled dimension sets of published ones (revision n); windows in end order."""
        through = {kind: self.complete_through(kind) for kind in self.sources}
        for kind, t in through.items():
            if t is not None and t > self.finalized.get(kind, EMPTY):
                self.finalized[kind] = t
        done = [w for w in self.unpublished if w[2] + w[1] * 1000 <= self.finalized.get(w[0], EMPTY)]
        done.sort(key=lambda w: (w[2] + w[1] * 1000, w[1], w[0]))
        out: list[tuple[WindowKey, list[tuple[PendingKey, WindowAggregate]]]] = []
        for wkey in done:
            self.unpublished.discard(wkey)
            window = self.windows[wkey]
            results = WindowResults(*wkey)
            aggs: list[tuple[PendingKey, WindowAggregate]] = []
            for dk in sorted(window.sets):
                slot = window.sets[dk]
                if slot.revision > 0:
                    continue
                slot.revision = 1 - slot.revision
                aggs.append(((*wkey, dk), results.aggregate(_by_source(slot.parts), slot.dims, dk, slot.revision)))
            window.published = True
            out.append((wkey, aggs))
        return out

    def ready(self) -> list[tuple[PendingKey, WindowAggregate]]:
        """The aggregates of `ready_windows`, in one list."""
        return [item for _, aggs in self.ready_windows() for item in aggs]

    def expired(self) -> list[tuple[WindowKey, PendingWindow]]:
        """Finalized windows past the backfill retention: removed from the state."""
        gone = [
            w for w in self.windows
            if w not in self.unpublished and w[2] + w[1] * 1000 <= self.finalized.get(w[0], EMPTY) - RETAIN_MS
        ]  # fmt: skip
        return [(w, self.windows.pop(w)) for w in gone]


def restore_finalizer(sources: Mapping[str, Iterable[str]], state: Iterable[tuple[StateKey, Any]]) -> Finalizer:
    """A finalizer from its stored state (llmpulse.streams.state_keys), this version's or the
    previous one's (one `P` value per window and dimension set, kept until the window expires).

    A window's state is applied in the order it was written: the previous version's sets,
    then the received messages (a later copy of a source's set replaces an earlier one),
    then the revisions."""
    fin = Finalizer(sources)
    by_shape: dict[str, list[tuple[StateKey, Any]]] = {}
    for key, value in state:
        by_shape.setdefault(key.shape, []).append((key, value))

    def window_of(key: StateKey) -> PendingWindow:
        wkey = (key.kind, key.window_s, key.start_ms)
        window = fin.windows.get(wkey)
        if window is None:
            window = fin.windows[wkey] = PendingWindow()
        return window

    for key, value in by_shape.get("F", []):
        fin.finalized[key.kind] = int(value)
    for key, value in by_shape.get("P", []):
        window = window_of(key)
        window.sets[key.dims_key] = Pending.from_json(value)
        window.legacy.add(key.dims_key)
        window.published = window.published or window.sets[key.dims_key].revision != 0
    for key, value in sorted(by_shape.get("W", []), key=lambda kv: kv[0].chunk):
        window = window_of(key)
        window.chunks[key.source] = max(window.chunks.get(key.source, 0), key.chunk + 1)
        # this version stores the sets' JSON text; the one before, the list they decode to
        if isinstance(value, str):
            entries = [(e.dims_key, e.dims, bytes(e.state)) for e in decode_received_sets(value)]
        else:
            entries = [(dk, dims, pack_state(state)) for dk, dims, state in value]
        for dims_key, dims, packed in entries:
            slot = window.sets.get(dims_key)
            if slot is None:
                slot = window.sets[dims_key] = Pending(dims)
            slot.parts[key.source] = packed
    for key, value in by_shape.get("V", []):
        window = window_of(key)
        window.restore_revisions(value)
        window.stored = True
    for wkey, window in fin.windows.items():
        if not window.stored:  # published with the finalized mark, or not yet
            rev = 1 if wkey[2] + wkey[1] * 1000 <= fin.finalized.get(wkey[0], EMPTY) else 0
            for dk, p in window.sets.items():
                # a previous version's set keeps the revision it stored, unless it stored none
                if dk not in window.legacy or p.revision == 0:
                    p.revision = rev
        window.published = any(p.revision != 0 for p in window.sets.values())
        if any(p.revision <= 0 for p in window.sets.values()):
            fin.unpublished.add(wkey)
    for key, value in by_shape.get("M", []):
        fin.marks.setdefault(key.kind, {})[key.source] = int(value)
    for _, value in by_shape.get("O", []):
        fin.applied = int(value)
    return fin


class StoredFinalizer:
    """A partials partition's Finalizer with its state kept in a table (changelog_map.py in
    the worker, a dict in some tests), written per window: each received message is one write
    (its dimension sets as received). A window's publication is recorded by the finalized
    mark (one write per batch); only windows published again (backfills, late events) or
    new after the mark passed them store their revisions (one write each).

    Use per batch of partials messages: `apply` each, then `commit(offset)`, then
    `publishable()` (the aggregates to publish), publish them and wait for their delivery,
    then `published()` (the state says so: a crash before it publishes them again, under
    the same keys), then `expire()`."""

    def __init__(self, fp: int, fin: Finalizer, table: MutableMapping[str, Any]) -> None:
        self.fp = fp
        self.fin = fin
        self.table = table
        self._marks: set[tuple[str, str]] = set()
        self._ready: list[tuple[WindowKey, list[tuple[PendingKey, WindowAggregate]]]] = []

    @classmethod
    def restore(cls, fp: int, sources: Mapping[str, Iterable[str]], table: MutableMapping[str, Any]) -> StoredFinalizer:
        prefix = f"{fp}|"
        state = [
            (parsed, value) for key, value in list(table.items())
            if isinstance(key, str) and key.startswith(prefix) and value is not None
            and (parsed := SK.parse(key)) is not None and parsed.shape != "R"
        ]  # fmt: skip
        return cls(fp, restore_finalizer(sources, state), table)

    def apply(self, m: WindowPartials | ReceivedPartials | CloseMark) -> None:
        fin, fp, table = self.fin, self.fp, self.table
        if isinstance(m, CloseMark):
            fin.set_mark(m.kind, m.src, m.mark)
            self._marks.add((m.kind, m.src))
            return
        wkey = fin.add(m)
        if wkey is None:
            return
        window = fin.windows[wkey]
        if m.chunk < 0:  # a previous version's message: kept as that version kept it
            for entry in m.sets:
                table[SK.legacy_pending_key(fp, *wkey, entry.dims_key)] = window.sets[entry.dims_key].to_json()
                window.legacy.add(entry.dims_key)
            return
        table[SK.chunk_key(fp, *wkey, m.source, m.chunk)] = encode_sets(m.sets)
        # a window sent again (after a restore, or with backfilled events) holds the same
        # dimension sets or more, in the same order: its chunks overwrite the earlier ones
        window.chunks[m.source] = max(window.chunks.get(m.source, 0), m.chunks)

    def commit(self, applied: int) -> None:
        """The batch through partials offset `applied` is applied: its marks and revisions, then the offset."""
        fin, fp, table = self.fin, self.fp, self.table
        for kind, src in self._marks:
            table[SK.mark_key(fp, kind, src)] = fin.marks[kind][src]
        self._marks.clear()
        for wkey in fin.take_revised():
            table[SK.revisions_key(fp, *wkey)] = fin.windows[wkey].revisions()
            fin.windows[wkey].stored = True
        fin.applied = applied
        table[SK.applied_key(fp)] = applied

    def publishable(self) -> list[WindowAggregate]:
        """The aggregates to publish now, in window order (then call `published`)."""
        self._ready = self.fin.ready_windows()
        return [agg for _, aggs in self._ready for _, agg in aggs]

    def published(self) -> None:
        """The aggregates of the last `publishable` are delivered: the state says so."""
        fin, fp, table = self.fin, self.fp, self.table
        for wkey, _ in self._ready:
            window = fin.windows[wkey]
            if window.stored:
                table[SK.revisions_key(fp, *wkey)] = window.revisions()
        if self._ready:
            for kind, mark in fin.finalized.items():
                table[SK.finalized_key(fp, kind)] = mark
        self._ready = []

    def expire(self) -> None:
        """Drop the windows past the backfill retention, from memory and from the table."""
        fp, table = self.fp, self.table
        for wkey, window in self.fin.expired():
            gone = [SK.revisions_key(fp, *wkey)] if window.stored else []
            gone += [SK.chunk_key(fp, *wkey, src, c) for src, n in window.chunks.items() for c in range(n)]
            gone += [SK.legacy_pending_key(fp, *wkey, dk) for dk in window.legacy]
            for k in gone:
                if k in table:
                    del table[k]
