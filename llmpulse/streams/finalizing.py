"""Merge window partials from every source partition into final window aggregates.

A window of one kind is final once every source partition of that kind that has data
has reported a close mark at or past the window's end: then all partials are in.
Partials are kept per source, so a partial re-sent after a crash replaces its earlier
copy instead of adding to it. A source that has seen no event yet does not hold the
others back; if it later brings data for a window already finalized (a backfill of old
events), the window is kept for a while after finalizing and published again, under
the same key with a higher revision, so the stored aggregate converges to the truth.
Late events a partition counted after closing their window arrive the same way, as the
part of source `<source>~late` (windowing.py, cumulative); such a source sends no close
mark and is never waited for (`complete_through` reads only `sources`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka.partitioner import murmur2

from llmpulse.config.worker import FINALIZED_RETENTION_S
from llmpulse.schemas.aggregate import WindowAggregate
from llmpulse.streams.accumulators import ACCUMULATORS
from llmpulse.streams.windowing import Partial

log = logging.getLogger(__name__)

PendingKey = tuple[str, int, int, str]  # kind, window_s, start_ms, dims_key


@dataclass
class Pending:
    dims: dict[str, str]
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
    revision: int = 0  # > 0 once published; each re-publication increments it

    def to_json(self) -> dict[str, Any]:
        return {"dims": self.dims, "parts": self.parts, "rev": self.revision}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Pending:
        return cls(d["dims"], d["parts"], d.get("rev", 0))


def partial_key(kind: str, window_s: int) -> bytes:
    """The key of a window size's partials: every dimension set of a window meets in one finalizer."""
    return f"{kind}|{window_s}".encode()


def finalizer_partition(kind: str, window_s: int, partitions: int) -> int:
    """The partials partition (and so the finalizer state, rule state included) of a window size.

    Kafka's default partitioner (murmur2 of the key), which placed partials before they
    were sent to an explicit partition: a deployment's state stays where it was."""
    return int(murmur2(partial_key(kind, window_s)) & 0x7FFFFFFF) % partitions


EMPTY = -(2**62)  # the close mark of a source that has seen no event yet
RETAIN_MS = round(FINALIZED_RETENTION_S * 1000)  # how long a finalized window accepts a backfilled partial


class Finalizer:
    def __init__(self, sources: Mapping[str, Iterable[str]]) -> None:
        self.sources = {kind: set(srcs) for kind, srcs in sources.items()}
        self.pending: dict[PendingKey, Pending] = {}
        self.marks: dict[str, dict[str, int]] = {kind: {} for kind in self.sources}
        self.finalized: dict[str, int] = {}
        self.stale = 0
        self.applied: int | None = None  # the last partials offset this state holds

    def add_partial(self, p: Partial) -> PendingKey | None:
        """Keep a partial; None when its window is past the backfill retention (counted)."""
        if p.end_ms <= self.finalized.get(p.kind, EMPTY) - RETAIN_MS:
            self.stale += 1
            log.warning(
                "partial of %s %ss window %s from %s arrived %d s after the window was final; "
                "the raw events are stored, the window's aggregate keeps its published figures",
                p.kind, p.window_s, p.start_ms, p.source, (self.finalized[p.kind] - p.end_ms) // 1000,
            )
            return None
        key = (p.kind, p.window_s, p.start_ms, p.dims_key)
        slot = self.pending.get(key)
        if slot is None:
            slot = self.pending[key] = Pending(p.dims)
        if slot.parts.get(p.source) != p.state:
            slot.parts[p.source] = p.state
            if slot.revision > 0:
                # published before: publish again (once, however many parts change before then)
                slot.revision = -slot.revision
        return key

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

    def ready(self) -> list[tuple[PendingKey, WindowAggregate]]:
        """Aggregates to publish: complete windows (revision 1) and backfilled ones (revision n)."""
        out: list[tuple[PendingKey, WindowAggregate]] = []
        through = {kind: self.complete_through(kind) for kind in self.sources}
        for kind, t in through.items():
            if t is not None and t > self.finalized.get(kind, EMPTY):
                self.finalized[kind] = t
        done = [
            k for k, slot in self.pending.items()
            if slot.revision <= 0 and k[2] + k[1] * 1000 <= self.finalized.get(k[0], EMPTY)
        ]  # fmt: skip
        done.sort(key=lambda k: (k[2] + k[1] * 1000, k[1], k[3]))
        for key in done:
            kind, s, start, dk = key
            slot = self.pending[key]
            slot.revision = 1 - slot.revision
            cls = ACCUMULATORS[kind]
            acc = cls()
            for state in slot.parts.values():
                acc.merge(cls.from_state(state))  # type: ignore[arg-type]
            agg = acc.result(s, start, slot.dims, dk)
            agg.revision = slot.revision
            out.append((key, agg))
        return out

    def expired(self) -> list[PendingKey]:
        """Finalized windows past the backfill retention: removed from the state."""
        gone = [
            k for k, slot in self.pending.items()
            if slot.revision > 0 and k[2] + k[1] * 1000 <= self.finalized.get(k[0], EMPTY) - RETAIN_MS
        ]  # fmt: skip
        for k in gone:
            del self.pending[k]
        return gone
