"""Event-time tumbling windows of one source partition, owned by us (not Faust's windowed tables).

Events are added to accumulators of the smallest window size, one per finest
dimension tuple; larger windows and coarser dimension sets are rolled up from those
when a window closes. A window closes once the partition's event time passes its end
plus the grace period, or, when the partition goes idle, once wall-clock time since
the last event has carried event time that far. Events of a closed window are late.

Replays never count twice: the partition's applied offset skips whole replays, and
each accumulator remembers the last offset it absorbed, which covers a crash in the
middle of persisting a batch. Copies of an event at new offsets (resent by a producer)
are dropped by event_id while their window is open or recently closed (dedup.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from llmpulse.schemas.aggregate import dimensions_key
from llmpulse.streams.accumulators import ACCUMULATORS, Accumulator
from llmpulse.streams.dedup import ChunkKey, SeenIds
from llmpulse.streams.positions import BATCH_SLOTS

AccKey = tuple[int, tuple[str, ...]]


@dataclass(slots=True)
class Partial:
    """One closed window of one dimension set, as far as one source partition saw it."""

    kind: str
    window_s: int
    start_ms: int
    dims: dict[str, str]
    dims_key: str
    source: str
    state: dict[str, Any]

    @property
    def end_ms(self) -> int:
        return self.start_ms + self.window_s * 1000

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "partial", "kind": self.kind, "s": self.window_s, "t": self.start_ms,
            "dims": self.dims, "dk": self.dims_key, "src": self.source, "state": self.state,
        }  # fmt: skip

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Partial:
        return cls(d["kind"], d["s"], d["t"], d["dims"], d["dk"], d["src"], d["state"])


@dataclass(slots=True)
class Late:
    offset: int
    event: Any
    window_end_ms: int


@dataclass(slots=True)
class Applied:
    late: list[Late] = field(default_factory=list)
    duplicates: int = 0  # copies of events already counted (same event_id), dropped


@dataclass
class CloseResult:
    partials: list[Partial] = field(default_factory=list)
    removed: list[AccKey] = field(default_factory=list)
    removed_ids: list[ChunkKey] = field(default_factory=list)  # id chunks past the dedup horizon
    mark_ms: int | None = None


def project(dimension_names: tuple[str, ...], dim_set: tuple[int, ...], tup: tuple[str, ...]) -> dict[str, str] | None:
    """The dimension set's values of a finest tuple; None when a member is unattributed."""
    out = {}
    for i in dim_set:
        v = tup[i]
        if v == "":
            return None
        out[dimension_names[i]] = v
    return out


class PartitionWindows:
    def __init__(
        self,
        kind: str,
        source: str,
        windows_s: Iterable[int],
        grace_s: float,
        idle_s: float,
        dimension_sets: Iterable[Iterable[str]],
        dedup_horizon_s: float = 300.0,
    ) -> None:
        self.kind = kind
        self.source = source
        self.acc_cls = ACCUMULATORS[kind]
        self.windows_s = sorted(set(windows_s))
        self.base_ms = self.windows_s[0] * 1000
        self.max_ms = self.windows_s[-1] * 1000
        for s in self.windows_s:
            if (s * 1000) % self.base_ms:
                raise ValueError(f"window {s}s is not a multiple of the smallest window {self.windows_s[0]}s")
        self.grace_ms = round(grace_s * 1000)
        self.idle_s = idle_s
        names = self.acc_cls.dimension_names
        self.dim_sets = [tuple(names.index(d) for d in ds) for ds in dimension_sets]
        self.accs: dict[AccKey, Accumulator] = {}
        self.acc_offsets: dict[AccKey, int] = {}
        self.applied_offset = -1
        self.max_ts_ms: int | None = None
        self.close_mark_ms: int | None = None
        self.last_event_wall: float | None = None
        self.dirty: set[AccKey] = set()
        self.seen = SeenIds(self.base_ms, round(dedup_horizon_s * 1000))

    # -- processing ---------------------------------------------------------------------------
    def apply(self, batch: Iterable[tuple[int, Any]], now_wall: float) -> Applied:
        """Add (offset, event) pairs in offset order; returns the late ones and the copies dropped."""
        out = Applied()
        late = out.late
        duplicates = 0
        accs = self.accs
        acc_offsets = self.acc_offsets
        dirty = self.dirty
        key_of = self.acc_cls.key_of
        base = self.base_ms
        mark = self.close_mark_ms
        applied = self.applied_offset
        max_ts = self.max_ts_ms
        new_cls = self.acc_cls
        seen = self.seen
        ids_start: int | None = None
        ids: set[int] = set()
        ids_added: list[str] = []
        was_seen = False
        for offset, event in batch:
            if offset <= applied:
                continue
            ts = int(event.ts.timestamp() * 1000)
            start = ts - ts % base
            event_id = event.event_id
            h = hash(event_id)
            if mark is not None and start + base <= mark:
                if seen.seen_closed(start, h):
                    duplicates += 1
                else:
                    late.append(Late(offset, event, start + base))
                applied = offset
                continue
            if start != ids_start:
                ids, ids_added = seen.open_window(start)
                ids_start = start
            if h in ids:
                duplicates += 1
                applied = offset
                continue
            ids.add(h)
            ids_added.append(event_id)
            key = (start, key_of(event))
            acc = accs.get(key)
            if acc is None:
                acc = accs[key] = new_cls()
            elif acc_offsets.get(key, -1) >= offset:
                applied = offset
                continue
            acc.agg(event)  # type: ignore[attr-defined]
            acc_offsets[key] = offset
            dirty.add(key)
            applied = offset
            was_seen = True
            if max_ts is None or ts > max_ts:
                max_ts = ts
        self.applied_offset = applied
        self.max_ts_ms = max_ts
        if was_seen:
            self.last_event_wall = now_wall
        out.duplicates = duplicates
        return out

    def consumed_through(self, offset: int) -> None:
        """Every event of the messages up to `offset` is accounted for (applied, late or invalid)."""
        last = (offset + 1) * BATCH_SLOTS - 1
        if last > self.applied_offset:
            self.applied_offset = last

    @property
    def applied_message(self) -> int | None:
        """The last message offset the state holds; None before the first."""
        return self.applied_offset // BATCH_SLOTS if self.applied_offset >= 0 else None

    def watermark(self, now_wall: float) -> int:
        """Event time of this partition; while idle it advances with the wall clock."""
        if self.max_ts_ms is None:
            return int((now_wall - self.idle_s) * 1000)
        wm = self.max_ts_ms
        if self.last_event_wall is None:
            # restored after a restart: no wall-clock reference yet; start counting now
            self.last_event_wall = now_wall
        idle = now_wall - self.last_event_wall
        if idle >= self.idle_s:
            wm = max(wm, self.max_ts_ms + int(idle * 1000))
        return wm

    def close(self, now_wall: float, force: bool = False) -> CloseResult:
        """Close every window whose end plus grace the watermark has passed."""
        result = CloseResult()
        if self.max_ts_ms is None and not self.accs:
            # nothing seen yet: no event time of our own, so close nothing and claim no mark
            return result
        new_mark = math.inf if force else self.watermark(now_wall) - self.grace_ms
        prev = self.close_mark_ms
        if prev is not None and new_mark <= prev:
            result.mark_ms = prev
            return result
        groups: dict[tuple[int, int], list[AccKey]] = {}
        removable: list[AccKey] = []
        for key in self.accs:
            b = key[0]
            for s in self.windows_s:
                size = s * 1000
                t = b - b % size
                end = t + size
                if end <= new_mark and (prev is None or end > prev):
                    groups.setdefault((s, t), []).append(key)
            if (b - b % self.max_ms) + self.max_ms <= new_mark:
                removable.append(key)
        names = self.acc_cls.dimension_names
        for (s, t), keys in sorted(groups.items()):
            # a fixed merge order: a window closed again after a restore gives the same
            # state to the bit (float sums depend on the order), so it is not re-published
            keys.sort()
            merged: dict[str, tuple[dict[str, str], Any]] = {}
            for dim_set in self.dim_sets:
                for key in keys:
                    dims = project(names, dim_set, key[1])
                    if dims is None:
                        continue
                    dk = dimensions_key(dims)
                    slot = merged.get(dk)
                    acc: Any
                    if slot is None:
                        acc = self.acc_cls()
                        merged[dk] = (dims, acc)
                    else:
                        acc = slot[1]
                    acc.merge(self.accs[key])
            for dk, (dims, acc) in merged.items():
                result.partials.append(Partial(self.kind, s, t, dims, dk, self.source, acc.to_state()))
        for key in removable:
            del self.accs[key]
            self.acc_offsets.pop(key, None)
            self.dirty.discard(key)
        result.removed = removable
        if new_mark != math.inf:
            self.close_mark_ms = int(new_mark)
        elif self.max_ts_ms is not None:
            self.close_mark_ms = max(self.close_mark_ms or 0, self.max_ts_ms - self.max_ts_ms % self.max_ms + self.max_ms)
        if self.close_mark_ms is not None:
            result.removed_ids = self.seen.close_through(self.close_mark_ms)
        result.mark_ms = self.close_mark_ms
        return result

    # -- persistence ----------------------------------------------------------------------------
    def meta_state(self) -> dict[str, Any]:
        return {"o": self.applied_offset, "m": self.max_ts_ms, "c": self.close_mark_ms}

    def restore_meta(self, s: dict[str, Any]) -> None:
        self.applied_offset = s["o"]
        self.max_ts_ms = s["m"]
        self.close_mark_ms = s["c"]

    def acc_state(self, key: AccKey) -> dict[str, Any]:
        return {"o": self.acc_offsets[key], "a": self.accs[key].to_state()}

    def restore_acc(self, key: AccKey, s: dict[str, Any]) -> None:
        self.accs[key] = self.acc_cls.from_state(s["a"])
        self.acc_offsets[key] = s["o"]

    def take_dirty(self) -> list[AccKey]:
        keys = [k for k in self.dirty if k in self.accs]
        self.dirty.clear()
        return keys
