"""Event-time tumbling windows of one source partition, owned by us (not Faust's windowed tables).

Events are added to accumulators of the smallest window size, one per finest
dimension tuple; larger windows and coarser dimension sets are rolled up from those
when a window closes (rollup.py: the same state, to the bit, whatever it derives a set
from). A window closes once the partition's event time passes its end plus the grace
period, or, when the partition goes idle, once wall-clock time since the last event
has carried event time that far. Events of a closed window are late.

A late event whose window closed less than the allowed lateness ago (event time of the
close mark) is still counted: it goes to a late accumulator of its window, and the next
close emits, for every window and dimension set it touched, a partial of source
`<source>~late` holding ALL late events of that window from this partition (cumulative,
because the finalizer replaces a source's part: a partial re-sent after a crash or a
restore is the same state, never added twice). The finalizer merges it as one more part
and publishes the window again with a higher revision. Late accumulators are persisted
like the others (offset per accumulator) and dropped once the largest window holding them
is past the allowed lateness; only events older than that are reported late. Their ids
join the closed window's (dedup.py), so a copy of a late event is a duplicate.

Replays never count twice: the partition's applied offset skips whole replays, and
each accumulator remembers the last offset it absorbed, which covers a crash in the
middle of persisting a batch. Copies of an event at new offsets (resent by a producer)
are dropped by event_id while their window is open or recently closed (dedup.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import groupby
from operator import itemgetter
from sys import intern
from typing import TYPE_CHECKING, Any

from llmpulse.schemas.partials import AccStateText
from llmpulse.streams.accumulators import ACCUMULATORS, Accumulator
from llmpulse.streams.dedup import ChunkKey, SeenIds
from llmpulse.streams.positions import BATCH_SLOTS
from llmpulse.streams.rollup import RollUp, Span

if TYPE_CHECKING:
    from llmpulse.streams.window_state import WindowRecords

AccKey = tuple[int, tuple[str, ...]]
_START = itemgetter(0)  # of an AccKey
_TUPLE = itemgetter(1)
LATE_SUFFIX = "~late"  # source of the partials of late events: never a source the finalizer waits for


def event_ms(ts: datetime) -> int:
    """An event's time in ms since the epoch (truncated: its window, the partition's event time)."""
    return int(ts.timestamp() * 1000)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
_NO_TIME = datetime(1, 1, 1, tzinfo=UTC)  # apply's "no event counted" (compared by identity)
# [lo, hi) of no datetime (lo > hi): apply takes each such event's time in ms
_NO_SPAN = (datetime.max.replace(tzinfo=UTC), datetime.min.replace(tzinfo=UTC))
# apply's view of a smallest window: lo, hi, closed, its id set, the ids added, groups by dims
_Span = tuple[datetime, datetime, bool, set[int], list[str], dict[tuple[str, ...], list[Any]]]


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



@dataclass(slots=True)
class Late:
    offset: int
    event: Any
    window_end_ms: int


@dataclass(slots=True)
class Applied:
    late: list[Late] = field(default_factory=list)  # past the allowed lateness: dead letters
    duplicates: int = 0  # copies of events already counted (same event_id), dropped
    revised: int = 0  # late events within the allowed lateness, counted in a revision of their window


@dataclass
class CloseResult:
    partials: list[Partial] = field(default_factory=list)
    removed: list[AccKey] = field(default_factory=list)
    removed_ids: list[ChunkKey] = field(default_factory=list)  # id chunks past the dedup horizon
    removed_late: list[AccKey] = field(default_factory=list)  # late accumulators past the allowed lateness
    mark_ms: int | None = None


class PartitionWindows:
    def __init__(
        self,
        kind: str,
        source: str,
        windows_s: Iterable[int],
        grace_s: float,
        idle_s: float,
        dimension_sets: Iterable[Iterable[str]] | Mapping[int, Iterable[Iterable[str]]],
        dedup_horizon_s: float = 300.0,
        allowed_lateness_s: float = 0.0,
    ) -> None:
        """`dimension_sets`: the same for every window size, or per window size (every size listed)."""
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
        per_size = (
            dimension_sets if isinstance(dimension_sets, Mapping)
            else {s: list(map(tuple, dimension_sets)) for s in self.windows_s}
        )  # fmt: skip
        # per window size, each dimension set once (listed twice, or in another order, it would
        # be counted twice under the same dimensions_key): (its names, their indexes in the tuple)
        self.dim_sets_of: dict[int, list[tuple[tuple[str, ...], tuple[int, ...]]]] = {}
        for s in self.windows_s:
            sets = self.dim_sets_of[s] = []
            for ds in per_size[s]:
                set_names = tuple(ds)
                if sorted(set_names) not in [sorted(n) for n, _ in sets]:
                    sets.append((set_names, tuple(names.index(d) for d in set_names)))
        self.rollup = RollUp(self.acc_cls, self.windows_s, self.dim_sets_of)
        self.accs: dict[AccKey, Accumulator] = {}
        # the keys of `accs` by smallest-window start, so that a close reads only the windows it
        # closes, not every open key (a batch's close mostly closes nothing); each list is sorted
        # when its window closes, new keys appended after it (sorted again, a short run, by Timsort);
        # added to by _add_key only (a new accumulator's, applied or restored), removed by close
        self.keys_by_start: dict[int, list[AccKey]] = {}
        self.acc_offsets: dict[AccKey, int] = {}
        self.restored_acc_offset = -1  # the largest offset of a restored accumulator
        self.applied_offset = -1
        self.max_ts_ms: int | None = None
        # apply's _bounds by window start, kept across batches (~1.5 us each: more than a
        # sparse partition's batch of one or two events saves by them)
        self.bounds_of: dict[int, tuple[datetime, datetime]] = {}
        self.close_mark_ms: int | None = None
        self.last_event_wall: float | None = None
        self.dirty: set[AccKey] = set()
        self.seen = SeenIds(self.base_ms, round(dedup_horizon_s * 1000))
        self.lateness_ms = round(allowed_lateness_s * 1000)
        if self.lateness_ms > self.seen.horizon_ms:
            raise ValueError(
                f"allowed lateness {allowed_lateness_s} s exceeds the dedup horizon {dedup_horizon_s} s: "
                "copies of late events would be counted twice"
            )
        self.late_source = source + LATE_SUFFIX
        self.late_accs: dict[AccKey, Accumulator] = {}
        self.late_offsets: dict[AccKey, int] = {}
        self.late_dirty: set[AccKey] = set()  # to persist
        self.late_unsent: set[AccKey] = set()  # changed since their windows' late partials were emitted
        # which changelog records hold the accumulators, by window start (window_state.py's)
        self.records: dict[int, WindowRecords] | None = None

    # -- processing ---------------------------------------------------------------------------
    def apply(self, batch: Iterable[tuple[int, Any]], now_wall: float) -> Applied:
        """Add (offset, event) pairs in offset order; returns the late ones and the copies dropped.

        An event's `ts` is an aware datetime (every wire model's UtcDatetime, CallEventFast's)."""
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
        new_cls = self.acc_cls
        seen = self.seen
        late_from = None if mark is None else mark - self.lateness_ms  # closed windows ending after it take late events
        # an accumulator's own offset can be past the applied one only as restored (a crash
        # between its record and the meta's): otherwise every offset it holds is at or below
        # `applied`, below every event applied here, and its check is skipped
        check_offsets = self.restored_acc_offset > applied
        # the accumulators this batch changes, by key in the order first changed: [the offset of
        # its last event, the accumulator, its events in offset order]. Each is handed its events
        # at once after the loop (`agg_many`, the same state as one `agg` per event), then its
        # offset and its key in the dirty set, once per key, not per event (the same dirty set:
        # keys inserted in the order they were first changed, as one add per event did)
        groups: dict[AccKey, list[Any]] = {}
        # per smallest-window start met in this batch (_Span): the times that fall in it, whether
        # it is closed, its id set and its groups by dimension tuple (the lists of `groups`). An
        # event in the span of the event before it (most: a partition's events come in time
        # order) is placed by two datetime comparisons, not its time in ms (~0.4 us), which is
        # then taken only of the batch's latest counted time (event_ms is monotonic).
        spans: dict[int, _Span] = {}
        ms_of = (_NO_TIME, 0)  # the last time taken in ms, and its ms
        lo = hi = _NO_SPAN[0]  # nothing is in no span; the first event reads its own
        start = 0
        closed = False
        ids: set[int] = set()
        ids_added: list[str] = []
        by_dims: dict[tuple[str, ...], list[Any]] = {}
        latest = _NO_TIME  # the latest time of a counted event (it moves event time)
        try:
            for offset, event in batch:
                if offset <= applied:
                    continue
                ts = event.ts
                if not lo <= ts < hi:
                    ms = event_ms(ts)
                    ms_of = (ts, ms)
                    start = ms - ms % base
                    span = spans.get(start)
                    if span is None:
                        span = spans[start] = self._span(start, mark)
                    lo, hi, closed, ids, ids_added, by_dims = span
                event_id = event.event_id
                h = hash(event_id)
                if closed:
                    if seen.seen_closed(start, h):
                        duplicates += 1
                    elif late_from is not None and start + base > late_from:
                        self._apply_late(offset, (start, key_of(event)), event, h)
                        out.revised += 1
                    else:
                        late.append(Late(offset, event, start + base))
                    applied = offset
                    continue
                if h in ids:
                    duplicates += 1
                    applied = offset
                    continue
                ids.add(h)
                ids_added.append(event_id)
                dims = key_of(event)
                group = by_dims.get(dims)
                if check_offsets and acc_offsets.get((start, dims), -1) >= offset:
                    # counted before a crash (restored past the meta): its time was the partition's
                    # then, so it still moves event time, or this replay would close fewer windows
                    # than the first run did and count on time what that run counted late
                    applied = offset
                    if ts >= latest:
                        latest = ts
                    continue
                if group is None:
                    key = (start, dims)
                    acc = accs.get(key)
                    if acc is None:
                        key = self._add_key(start, dims)
                        acc = accs[key] = new_cls()
                    group = groups[key] = by_dims[dims] = [offset, acc, [event]]
                else:
                    group[0] = offset
                    group[2].append(event)
                applied = offset
                if ts >= latest:
                    latest = ts
        finally:  # what was absorbed, even if an event raised: a replay must not count it again
            for key, (last, acc, events) in groups.items():
                if len(events) == 1:  # agg_many costs more for one event (sparse traffic: most keys)
                    acc.agg(events[0])  # type: ignore[attr-defined]
                else:
                    acc.agg_many(events)
                acc_offsets[key] = last
                dirty.add(key)
        self.applied_offset = applied
        if latest is not _NO_TIME:
            ts_ms = ms_of[1] if latest is ms_of[0] else event_ms(latest)
            if self.max_ts_ms is None or ts_ms > self.max_ts_ms:
                self.max_ts_ms = ts_ms
        if groups:  # an event counted
            self.last_event_wall = now_wall
        out.duplicates = duplicates
        return out

    def _span(self, start: int, mark: int | None) -> _Span:
        """apply's view of the smallest window at `start`: its bounds (_bounds), closed or, open,
        its id set and its groups (new)."""
        bounds = self.bounds_of.get(start)
        if bounds is None:
            if len(self.bounds_of) >= 256:  # of windows long closed (the open ones are a few)
                self.bounds_of.clear()
            bounds = self.bounds_of[start] = self._bounds(start)
        lo, hi = bounds
        if mark is not None and start + self.base_ms <= mark:
            return lo, hi, True, set(), [], {}
        ids, added = self.seen.open_window(start)
        return lo, hi, False, ids, added, {}

    def _bounds(self, start: int) -> tuple[datetime, datetime]:
        """[lo, hi): the datetimes whose event_ms lies in the smallest window at `start`; _NO_SPAN
        where the bounds' own ms say otherwise (float rounding far from the epoch) or past
        datetime's range."""
        base = self.base_ms
        try:
            lo = _EPOCH + timedelta(milliseconds=start)
            hi = _EPOCH + timedelta(milliseconds=start + base)
        except OverflowError:
            return _NO_SPAN
        # event_ms is monotonic, and no datetime lies between hi - 1 us and hi
        if event_ms(lo) >= start and event_ms(hi - _ONE_US) < start + base:
            return lo, hi
        return _NO_SPAN

    def _apply_late(self, offset: int, key: AccKey, event: Any, h: int) -> None:
        # the id first, as for an open window: a replay after a crash records it again
        self.seen.add_late(key[0], h, event.event_id)
        if self.late_offsets.get(key, -1) >= offset:
            return  # absorbed before a crash whose meta was lost: replayed, not counted again
        acc = self.late_accs.get(key)
        if acc is None:
            acc = self.late_accs[key] = self.acc_cls()
        acc.agg(event)  # type: ignore[attr-defined]
        self.late_offsets[key] = offset
        self.late_dirty.add(key)
        self.late_unsent.add(key)

    def _add_key(self, start: int, dims: tuple[str, ...]) -> AccKey:
        """The key of a new accumulator, indexed by its start (`keys_by_start`).

        Its strings are kept as long as its window (and its state key, in the changelog's live
        keys): interned, a model or user named by thousands of keys is one string, not one
        decoded copy per event (at 10,000 users, ~40 MB)."""
        key = (start, tuple(map(intern, dims)))
        keys = self.keys_by_start.get(start)
        if keys is None:
            self.keys_by_start[start] = [key]
        else:
            keys.append(key)
        return key

    def consumed_through(self, offset: int) -> None:
        """Every event of the messages up to `offset` is accounted for (applied, late or invalid)."""
        last = (offset + 1) * BATCH_SLOTS - 1
        if last > self.applied_offset:
            self.applied_offset = last

    @property
    def seen_event(self) -> bool:
        """Whether an event was counted (or restored); without one, `close` claims no mark."""
        return self.max_ts_ms is not None or bool(self.accs)

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
        if not self.seen_event:
            # nothing seen yet: no event time of our own, so close nothing and claim no mark
            return result
        new_mark = math.inf if force else self.watermark(now_wall) - self.grace_ms
        prev = self.close_mark_ms
        if prev is not None and new_mark <= prev:
            self._close_late(result, prev)
            self.rollup.end_close()
            result.mark_ms = prev
            return result
        # the finest accumulators of each window closing now, by smallest-window start in
        # ascending order, each start's sorted by key (the fixed merge order of _roll_up)
        spans_of: dict[tuple[int, int], list[Span]] = {}
        removable: list[AccKey] = []
        by_start = self.keys_by_start
        accs = self.accs
        max_ms = self.max_ms
        for b in sorted(by_start):
            closing = []
            for s in self.windows_s:
                size = s * 1000
                t = b - b % size
                end = t + size
                if end <= new_mark and (prev is None or end > prev):
                    closing.append((s, t))
            # its largest window is closed: usually closing now, or closed before a crash whose
            # tombstones were lost (restored past its close mark)
            remove = (b - b % max_ms) + max_ms <= new_mark
            if not closing and not remove:
                continue
            ks = by_start[b]
            if closing:
                # one start's keys by their tuples alone: the order of the keys, at about half
                # the cost (tuples of strings compared, not pairs of a start and a tuple)
                ks.sort(key=_TUPLE)
                span = Span(b, ks, [accs[k] for k in ks])
                for st in closing:
                    spans = spans_of.get(st)
                    if spans is None:
                        spans_of[st] = [span]
                    else:
                        spans.append(span)
            if remove:
                removable += ks
                del by_start[b]
        for (s, t), spans in sorted(spans_of.items()):
            self._roll_up(s, t, spans, True, self.source, result.partials)
        for key in removable:
            del accs[key]
            self.acc_offsets.pop(key, None)
            self.dirty.discard(key)
        result.removed = removable
        self.rollup.forget_through(new_mark)
        if new_mark != math.inf:
            self.close_mark_ms = int(new_mark)
        elif self.max_ts_ms is not None:
            self.close_mark_ms = max(self.close_mark_ms or 0, self.max_ts_ms - self.max_ts_ms % self.max_ms + self.max_ms)
        if self.close_mark_ms is not None:
            result.removed_ids = self.seen.close_through(self.close_mark_ms)
        self._close_late(result, prev)
        self.rollup.end_close()
        result.mark_ms = self.close_mark_ms
        return result

    def _roll_up(
        self, s: int, t: int, spans: list[Span], keep: bool, source: str, out: list[Partial]
    ) -> None:
        """The partials of window (s, t): the finest accumulators of `spans` (its smallest windows,
        each sorted by key) merged per dimension set (rollup.py: the same state, to the bit, as
        merging them one by one in key order, so a window closed again after a restore is not
        published again). `keep`: the window's keys are final (a closed window's, not its late
        events')."""
        kind = self.kind
        # one state per accumulator: a group of one accumulator is that accumulator (rollup.py),
        # often the same one in several sets (a user's only call is its model's, its app's...)
        states: dict[int, dict[str, Any]] = {}
        for dims, dk, acc in self.rollup.window(s, t, spans, keep):
            state = states.get(id(acc))
            if state is None:
                state = states[id(acc)] = acc.to_state()
            out.append(Partial(kind, s, t, dims, dk, source, state))

    def _close_late(self, result: CloseResult, prev_mark: int | None) -> None:
        """Emit the late partials of every window late events touched; drop those past the lateness.

        Each partial holds every late event of its window (cumulative). Emitted are the
        windows of late events applied since the last close, which ended less than the
        allowed lateness before `prev_mark` (the mark they were applied under, so the
        finalizer still holds them), and, after a restore, those of restored accumulators
        within that bound (their partial may not have gone out before the crash)."""
        if not self.late_accs:
            return
        if self.late_unsent:
            bound = -math.inf if prev_mark is None else prev_mark - self.lateness_ms
            touched = set()
            for b, _ in self.late_unsent:
                for s in self.windows_s:
                    size = s * 1000
                    t = b - b % size
                    if t + size > bound:
                        touched.add((s, t))
            self.late_unsent.clear()
            for s, t in sorted(touched):
                end = t + s * 1000
                keys = sorted(k for k in self.late_accs if t <= k[0] < end)
                spans = []
                for b, of_start in groupby(keys, key=_START):
                    ks = list(of_start)
                    spans.append(Span(b, ks, [self.late_accs[k] for k in ks]))
                self._roll_up(s, t, spans, False, self.late_source, result.partials)
        if self.close_mark_ms is None:
            return
        drop_through = self.close_mark_ms - self.lateness_ms
        max_ms = self.max_ms
        for key in [k for k in self.late_accs if k[0] - k[0] % max_ms + max_ms <= drop_through]:
            del self.late_accs[key]
            self.late_offsets.pop(key, None)
            self.late_dirty.discard(key)
            result.removed_late.append(key)

    # -- persistence ----------------------------------------------------------------------------
    def meta_state(self) -> dict[str, Any]:
        return {"o": self.applied_offset, "m": self.max_ts_ms, "c": self.close_mark_ms}

    def restore_meta(self, s: dict[str, Any]) -> None:
        self.applied_offset = s["o"]
        self.max_ts_ms = s["m"]
        self.close_mark_ms = s["c"]

    def acc_state(self, key: AccKey) -> dict[str, Any]:
        return {"o": self.acc_offsets[key], "a": self.accs[key].to_state()}

    def acc_state_to_encode(self, key: AccKey) -> AccStateText:
        """`acc_state` as msgspec's JSON encoder writes it, the same text (schemas.partials)."""
        return AccStateText(self.acc_offsets[key], self.accs[key].state_to_encode())

    def restore_acc(self, key: AccKey, s: dict[str, Any]) -> None:
        if key not in self.accs:
            key = self._add_key(*key)
        self.accs[key] = self.acc_cls.from_state(s["a"])
        self.acc_offsets[key] = s["o"]
        self.restored_acc_offset = max(self.restored_acc_offset, s["o"])

    def take_dirty(self) -> list[AccKey]:
        keys = [k for k in self.dirty if k in self.accs]
        self.dirty.clear()
        return keys

    def late_state(self, key: AccKey) -> dict[str, Any]:
        return {"o": self.late_offsets[key], "a": self.late_accs[key].to_state()}

    def restore_late(self, key: AccKey, s: dict[str, Any]) -> None:
        self.late_accs[key] = self.acc_cls.from_state(s["a"])
        self.late_offsets[key] = s["o"]
        # its partial may not have been emitted before the crash: emitted again at the next
        # close (the same cumulative state: the finalizer keeps its revision)
        self.late_unsent.add(key)

    def take_late_dirty(self) -> list[AccKey]:
        keys = [k for k in self.late_dirty if k in self.late_accs]
        self.late_dirty.clear()
        return keys
