"""Baselines of anomaly rules, kept incrementally as plain JSON data.

Guarantee: the expected value of a window is robust and knows the time of day, the state
per dimension set is bounded, and a window is not judged by a rescan of it (``Summaries``
keeps what the state implies beside it, never in it). It defends against the two
causes of most false anomalies: a daily peak compared with a 24-hour mean, and one past
incident dragging the mean up for a day.

Each window contributes ``(s1, s2)``: for rates (error_rate, success_rate,
intent_accuracy) the count and the volume (``errors``, ``requests``); for everything
else the value and its square. Entries are ``[key, windows, s1, s2]``.

Seasonal (the default): per time-of-day bucket (15 min by default), one entry for each
of the last ``baseline`` UTC days. The expected value is the median over previous days
of that bucket's per-day mean (for rates: the share pooled over the days but the worst),
the spread the median within-day variance plus the between-day MAD, so one bad day
changes nothing. Once a whole day a week back is in the
history, counts and sums are scaled by how busy that weekday was against the week
(``seasonal_weekly``). Until a bucket has a previous day, a rolling hour of 5-minute
buckets stands in, with the bounds made twice as wide.

Rolling: the same statistics over 5-minute buckets (``baseline/288``) of the span before
the window: the median of the bucket means, the median within-bucket variance plus the
MAD of the bucket means.

State: seasonal ``{"first", "slots": {slot: [[day, w, s1, s2], ...]}, "days": [[day, w,
s1], ...], "roll": [[start, w, s1, s2], ...]}``; rolling ``{"first", "roll": [...]}``. The seasonal slots are 96 x days
entries at most, the rolling hour 12; ``roll`` is sorted by start.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from operator import itemgetter
from typing import Any, Final

from llmpulse.schemas import WindowAggregate
from llmpulse.streams.rules.model import DAY_S, VOLUME_FIELD, AnomalyRule
from llmpulse.streams.rules.stats import mad_sigma, median

State = dict[str, Any]
_START, _VAR_DOF, _MEAN_DOF = itemgetter(0), itemgetter(1), itemgetter(2)
FALLBACK_SPAN_S = 3600
FALLBACK_BUCKET_S = 300
# rate metric -> (the count it is a share of the volume of), per aggregate
RATE_METRICS = frozenset({"error_rate", "success_rate", "intent_accuracy"})
_EXACT = 2**53  # below this, float sums of whole numbers are exact in any order


class Observation:
    """One window's value, and for rates its count and volume. Read-only (``Final``: mypy
    rejects a write); a plain slotted class, as one is made for every window an anomaly rule
    judges and a frozen dataclass's ``__init__`` cost three times as much."""

    __slots__ = ("count", "value", "volume")

    def __init__(self, value: float, count: int = 0, volume: int = 0) -> None:
        self.value: Final = value
        self.count: Final = count
        self.volume: Final = volume

    def __repr__(self) -> str:
        return f"Observation(value={self.value!r}, count={self.count!r}, volume={self.volume!r})"


@dataclass(frozen=True, slots=True)
class Expectation:
    """What a window should look like under the baseline."""

    mean: float  # expected value (for rates, the expected share)
    var: float  # variance of one window's value (0 for rates: binomial)
    windows: int  # windows of history behind it
    volume: int  # rates: the calls behind the expected share
    source: str  # "seasonal", "seasonal_weekly", "rolling" or "rolling_fallback"
    dispersion: float = 0.0  # sums: the series' median var / mean over its whole history

    @property
    def wide(self) -> bool:
        return self.source == "rolling_fallback"


def observe(rule: AnomalyRule, agg: WindowAggregate) -> Observation | None:
    value = getattr(agg, rule.metric)
    if value is None:
        return None
    v = float(value)
    if rule.metric not in RATE_METRICS:
        return Observation(v)
    n = int(getattr(agg, VOLUME_FIELD[rule.kind]))
    if n <= 0:
        return None
    return Observation(v, round(v * n), n)


def _sig(x: float) -> float | int:
    """A sum as stored: whole numbers as ints, others to 7 significant digits (the state is
    serialised every window; full float reprs doubled its size for no statistical gain)."""
    if (x.is_integer() if type(x) is float else float(x).is_integer()) and abs(x) < 2**53:
        return int(x)
    return float("%.7g" % x)  # noqa: UP031 (the digits of f"{x:.7g}", in half the time)


def _plus(total: float | int, s: float, w: int | None) -> float | int:
    """``_sig(total + s)``, the sum as stored. A whole stored sum plus a whole figure (``w``:
    ``s`` as an int when it is a whole float under 2**53, else None) is added as ints: the
    float sum of two integers under 2**53 is exact, so ``_sig`` would return that same int
    (five sums a window and anomaly rule made ``_sig`` a fifth of the rules' time)."""
    if w is not None and type(total) is int and -_EXACT < total < _EXACT and -_EXACT < (r := total + w) < _EXACT:
        return r
    return _sig(total + s)


def _count(entry: list[Any], s1: float, w1: int | None, s2: float, w2: int | None) -> None:
    """Count one window into ``entry`` (``[key, windows, s1, s2]``); ``w1``, ``w2``: see _plus.
    Whole sums plus whole figures (the commonest: counts, tokens, calls) are added here
    exactly as ``_plus`` adds them, without a call per sum (two of them a window and series)."""
    entry[1] += 1
    t = entry[2]
    if w1 is not None and type(t) is int and -_EXACT < t < _EXACT and -_EXACT < (r := t + w1) < _EXACT:
        entry[2] = r
    else:
        entry[2] = _sig(t + s1)
    t = entry[3]
    if w2 is not None and type(t) is int and -_EXACT < t < _EXACT and -_EXACT < (r := t + w2) < _EXACT:
        entry[3] = r
    else:
        entry[3] = _sig(t + s2)


def expected(rule: AnomalyRule, st: State, window_start_s: int) -> Expectation | None:
    """The baseline of the window starting at ``window_start_s``; None without history."""
    return Summaries(rule, st).expected(window_start_s)


def add(rule: AnomalyRule, st: State, window_start_s: int, obs: Observation) -> None:
    """Count one window into the baseline (after it was judged)."""
    Summaries(rule, st).add(window_start_s, obs)


_Part = tuple[float, float, float]  # a bucket-day's (ratio, variance x dof, mean x dof)
# a part with its place in the order series_dispersion sorts in: (ratio, the time-of-day
# bucket's position in the state's slots, the part's position among the bucket's, variance x
# dof, mean x dof); the first three are unique, so sorting these tuples is the stable sort by
# ratio of the parts concatenated in slot then day order
_Ranked = tuple[float, int, int, float, float]
_RANKED_VAR, _RANKED_MEAN, _RANK_ORDER = itemgetter(3), itemgetter(4), itemgetter(1, 2)


def series_dispersion(st: State) -> float:
    """The series' dispersion of a sum (variance / mean of one window), pooled over all its
    bucket-days: the within-day variances over the means, weighted by degrees of freedom,
    leaving out the most dispersed tenth of bucket-days (a burst the baseline kept).

    The dispersion of a sum (cost, tokens) is a property of the calls (one call's size times
    one plus its squared coefficient of variation), not of the hour: estimated from all of
    history it does not fall to a lucky quiet bucket's. Not the median of the bucket-days'
    ratios: a sample variance of heavy-tailed sums is right-skewed, its median below its mean,
    and the median read the detection bench's token sums as 30-40 % less dispersed than they
    are (p = 1e-7 for an ordinary busy minute). O(buckets x days), computed only when a
    window's effect already passed the factor (the engine asks lazily, and Summaries keeps
    it until the next window is added: the windows of an incident are kept out of the
    baseline, so an incident's every window reuses one figure).
    """
    parts: list[_Part] = []
    for entries in (st.get("slots") or {}).values():
        parts += _parts_of(entries)
    return _pooled_dispersion(parts)


def _parts_of(entries: list[list[Any]]) -> list[_Part]:
    """The parts of one time-of-day bucket's days, in order (``series_dispersion``)."""
    parts: list[_Part] = []
    append = parts.append
    for _, w, s1, s2 in entries:
        if w >= 3 and s1 > 0:
            mean = s1 / w
            var = max(0.0, s2 / w - mean * mean) * w / (w - 1)
            append((var / mean, var * (w - 1), mean * (w - 1)))
    return parts


def _pooled_dispersion(parts: list[_Part]) -> float:
    """``series_dispersion`` of the parts of all bucket-days, in slot then day order (sorted
    here: the order decides ties, so the same parts in the same order give the same float)."""
    if not parts:
        return 0.0
    parts.sort(key=_START)  # by ratio, stable
    kept = parts[: max(1, len(parts) - len(parts) // 10)]
    total_mean = sum(map(_MEAN_DOF, kept))
    return sum(map(_VAR_DOF, kept)) / total_mean if total_mean > 0 else 0.0


def _fallback_bucket(rule: AnomalyRule) -> int:
    b = max(rule.window, FALLBACK_BUCKET_S)
    return b - b % rule.window


Group = tuple[int, float, float]  # (windows, s1, s2) of a day or a bucket


def _summarise(rate: bool, groups: list[Group], source: str) -> Expectation | None:
    """Median over groups (days or buckets) of (windows, s1, s2)."""
    groups = [g for g in groups if g[0] > 0]
    if not groups:
        return None
    windows = sum(g[0] for g in groups)
    if rate:
        # pooled, not the median share: the median of rare-event shares is biased to 0 (most
        # 5-minute buckets of a 0.3% error rate have no error); robust by leaving out the
        # group with the highest share (one incident) once there are 3 or more
        used = [g for g in groups if g[2] > 0]
        if not used:
            return None
        if len(used) >= 3:
            used.remove(max(used, key=lambda g: g[1] / g[2]))
        volume = int(sum(g[2] for g in used))
        return Expectation(sum(g[1] for g in used) / volume, 0.0, windows, volume, source)
    means = [_mean(g) for g in groups]
    within = [_within(g) for g in groups]
    return _robust(means, within, windows, source)


def _mean(g: Group) -> float:
    return g[1] / g[0]


def _within(g: Group) -> float:
    """The variance within one group (unbiased)."""
    return max(0.0, g[2] / g[0] - (g[1] / g[0]) ** 2) * g[0] / max(1, g[0] - 1)


def _robust(means: list[float], within: list[float], windows: int, source: str) -> Expectation:
    """The median of the means; the median within-group variance plus the MAD of the means squared."""
    mid = median(means)
    return Expectation(mid, median(within) + mad_sigma(means, mid) ** 2, windows, 0, source)


def _weekday_factor(st: State, today: int, first_s: int) -> float | None:
    """How busy the same weekday was last week against a typical day of that week.

    Once a whole day 7 days back is in the history (a week of it), the day's level (mean
    per window) over the median level of the 7 days before today; clamped to 0.2..5. A
    quiet Saturday is then expected quiet, a busy Monday busy.
    """
    if first_s > (today - 7) * DAY_S:
        return None
    levels: dict[int, float] = {int(d): float(s1) / w for d, w, s1 in st.get("days") or () if w > 0}
    week = [levels[d] for d in range(today - 7, today) if d in levels]
    same = levels.get(today - 7)
    if same is None or len(week) < 7:
        return None
    typical = median(week)
    if typical <= 0:
        return None
    return min(5.0, max(0.2, same / typical))


@dataclass(slots=True)
class _Closed:
    """The rolling buckets that ended before the window judged, summarised once.

    Between two bucket boundaries the windows judged share these buckets (only the bucket
    still filling, and for zero_fill the one the span's start cuts, differ), so their means
    and variances are derived once; ``key`` names the buckets (first start, last start,
    how many, the series' first window), and ``Summaries.add`` drops the whole when a window
    lands in one of them."""

    key: tuple[int, int, int, int]
    last_start: int
    groups: list[Group]  # in bucket order, windows > 0
    windows: int
    means: list[float]  # not rates: sorted (the median sorts anyway)
    within: list[float] | None  # not rates: sorted, derived on first use (``within_sorted``)
    used: int  # rates: groups with calls
    calls1: float  # rates: their s1 and s2 summed
    calls2: float
    top: Group | None  # rates: the first group with the highest share
    whole: bool  # rates: every s1, s2 and sum a whole number below 2**53 (sums exact in any order)
    ordered: bool  # no mean is NaN (``means`` is in order: Summaries.mean_floor)

    def within_sorted(self) -> list[float]:
        """The groups' within-group variances, sorted: derived when an expectation is, not
        for every ``mean_floor`` (which reads only the means; on sparse traffic the span moves
        past a bucket boundary between most windows of a series)."""
        if self.within is None:
            self.within = sorted([_within(g) for g in self.groups])
        return self.within


class Summaries:
    """One anomaly rule's baseline of one series, with what it implies kept in step.

    Guarantee: ``expected`` returns exactly what a fresh computation from the state returns
    (the same floats: the same expressions over the same values), while the seasonal days of
    a time-of-day bucket are summarised once a day and a rolling bucket once it has ended,
    not again for every window. It defends against the cost of the rescan: every window of
    every series summarised its seasonal days and its rolling buckets again (rules were 11 s
    of a 62 s replay).

    The state dict is the only truth and all that is stored: a Summaries holds figures
    derived from it, never written into it, so a restored state gets a fresh Summaries that
    derives the same figures. What is kept, and when it goes:
    - seasonal: the expectation of the time-of-day bucket judged, for its UTC day. It reads
      only previous days (and their weekday levels), which a window of that day does not
      change; kept while the windows judged stay in that bucket (15 in a row by default),
      until a window of another day is added or the series' first window changes.
    - rolling: the buckets that ended before the window judged (``_Closed``), until the
      span moves past a bucket boundary or a window lands in one of them.
    - the series' dispersion of sums, until the next window is added; the parts of each
      time-of-day bucket it pools, until a window is added to that bucket, and all of them
      in the order the dispersion sorts them in (a window's bucket's parts are taken out of
      it and put back, not every bucket-day sorted again: O(buckets x days) to sum, not to sort).
    Every change of the state goes through ``add`` (the engine's only writer of a baseline);
    a caller that changes the state otherwise must use a new Summaries.
    """

    __slots__ = (
        "_bucket", "_closed", "_days_kept", "_dirty", "_dispersion", "_parts", "_ranked", "_rate",
        "_roll_bucket", "_roll_source", "_roll_span", "_seasonal", "_slot", "_stale", "_window",
        "_zero_filled", "rule", "state",
    )  # fmt: skip

    def __init__(self, rule: AnomalyRule, state: State) -> None:
        self.rule = rule
        self.state = state
        # the rule's derived figures, read once (they are computed properties of the model)
        self._rate = rule.metric in RATE_METRICS
        self._seasonal = rule.method == "seasonal"
        self._window = rule.window
        self._bucket = rule.bucket_s
        self._days_kept = rule.baseline_s // DAY_S
        self._zero_filled = rule.zero_filled
        if self._seasonal:
            self._roll_span, self._roll_bucket = FALLBACK_SPAN_S, _fallback_bucket(rule)
            self._roll_source = "rolling_fallback"
        else:
            self._roll_span, self._roll_bucket = rule.baseline_s, rule.bucket_s
            self._roll_source = "rolling"
        # seasonal: the expectation of one time-of-day bucket of one day, for a first window
        # (windows come in order: a bucket's 15 windows in a row reuse it, and one is kept)
        self._slot: tuple[int, int, int, Expectation | None] | None = None  # slot, day, first, exp
        self._closed: _Closed | None = None
        self._dispersion: float | None = None
        # dispersion: each time-of-day bucket's parts (its position in the slots, its parts
        # ranked), all of them in order in ``_ranked`` (None until derived, and while a ratio
        # is NaN: unordered, those are sorted as series_dispersion sorts them), and the parts
        # of the buckets a window was added to since, to take out of that order
        self._parts: dict[str, tuple[int, list[_Ranked]]] = {}
        self._ranked: list[_Ranked] | None = None
        self._stale: dict[str, list[_Ranked]] = {}
        self._dirty: dict[str, int] = {}  # buckets added to since, not kept: their positions

    # -- reading --------------------------------------------------------------------------

    def expected(self, window_start_s: int) -> Expectation | None:
        """The baseline of the window starting at ``window_start_s``; None without history."""
        if self._seasonal:
            seasonal = self._seasonal_expected(window_start_s)
            if seasonal is not None:
                return seasonal
        return self._rolling(window_start_s)

    def dispersion(self) -> float:
        """``series_dispersion`` of the state, kept until the next window is added; each
        time-of-day bucket's parts kept until a window is added to that bucket (the rest of
        the buckets, up to 96 x days of entries, are not read again for every window), and
        all of them kept in the order series_dispersion sorts them in: a window's bucket's
        parts are taken out and put back in their places, not all parts sorted again for
        every window (the sort was most of the cost, and grows with the days kept)."""
        if self._dispersion is None:
            self._dispersion = self._derive_dispersion()
        return self._dispersion

    def _derive_dispersion(self) -> float:
        kept, stale, dirty = self._parts, self._stale, self._dirty
        ranked = self._ranked
        changed: list[_Ranked] = []  # parts of buckets derived now
        slots: dict[str, list[list[Any]]] = self.state.get("slots") or {}
        # the buckets to derive: those a window was added to since (``_dirty``), when every
        # other one is kept; else all (a bucket's position in the slots never changes while
        # ``add`` is the only writer: it appends new buckets, never removes one). Rescanning
        # 96 buckets (x days) per window whose effect passed the factor was most of the cost
        todo: Iterable[tuple[int, tuple[str, list[list[Any]]]]]
        if ranked is not None and len(kept) + len(dirty) == len(slots):
            todo = [(rank, (key, slots[key])) for key, rank in dirty.items()]
        else:
            todo = enumerate(slots.items())
        dirty.clear()
        for rank, (key, entries) in todo:
            of_slot = kept.get(key)
            if of_slot is not None and of_slot[0] == rank:
                continue
            if of_slot is not None:  # a bucket moved in the slots' order: all derived again
                ranked = None
            old = stale.pop(key, None)
            if ranked is not None and old:
                for part in old:
                    del ranked[bisect_left(ranked, part)]
            parts = [(p[0], rank, i, p[1], p[2]) for i, p in enumerate(_parts_of(entries))]
            kept[key] = (rank, parts)
            changed += parts
        stale.clear()
        if any(p[0] != p[0] for p in changed):  # a NaN ratio has no place in an order
            ranked = None
        if ranked is None:
            every = [p for _, of_slot in kept.values() for p in of_slot]
            if any(p[0] != p[0] for p in every):
                self._ranked = None
                return _pooled_dispersion([(p[0], p[3], p[4]) for p in sorted(every, key=_RANK_ORDER)])
            every.sort()
            ranked = every
        else:
            for part in changed:
                insort(ranked, part)
        self._ranked = ranked
        if not ranked:
            return 0.0
        n = max(1, len(ranked) - len(ranked) // 10)  # as _pooled_dispersion keeps them
        total_mean = sum(map(_RANKED_MEAN, islice(ranked, n)))
        return sum(map(_RANKED_VAR, islice(ranked, n))) / total_mean if total_mean > 0 else 0.0

    def mean_floor(self, window_start_s: int) -> float | None:
        """A floor under ``expected(window_start_s).mean`` (whenever that is not None), from
        what is kept: the seasonal expectation itself; else, not for rates, the rolling
        buckets that ended before the window (``_Closed``, their means sorted): the buckets
        still filling, k of them at most, move the median of all the means at most k places
        down that order. None when it cannot say without deriving the expectation.

        Lets the engine leave the expectation of a window far under it underived (the
        commonest window: an effect needs ``factor`` x the mean); a floor, not the mean, as
        the means of the buckets still filling change with every window."""
        if self._seasonal:
            seasonal = self._seasonal_expected(window_start_s)
            if seasonal is not None:
                return seasonal.mean
        if self._rate:
            return None
        where = self._span_of(window_start_s)
        if where is None:
            return None
        buckets, lo, fixed, done, hi, first, _ = where
        closed = self._closed_of(buckets, fixed, done, first)
        if closed is None or not closed.ordered:
            return None
        for i in (*range(lo, fixed), *range(done, hi)):
            if buckets[i][2] != buckets[i][2]:  # a NaN sum: its mean has no place in the order
                return None
        k = (len(closed.means) - (fixed - lo) - (hi - done) - 1) // 2
        return closed.means[k] if k >= 0 else None

    def _seasonal_expected(self, now_s: int) -> Expectation | None:
        today, sec = divmod(now_s, DAY_S)
        slot = sec // self._bucket
        first = self.state.get("first")
        if first is None:  # no window added yet (the zero fill would count from now)
            return self._seasonal_of(slot, today, now_s)
        kept = self._slot
        if kept is not None and kept[0] == slot and kept[1] == today and kept[2] == first:
            return kept[3]
        exp = self._seasonal_of(slot, today, now_s)
        self._slot = (slot, today, first, exp)
        return exp

    def _seasonal_of(self, slot: int, today: int, now_s: int) -> Expectation | None:
        """The median over previous days of this time-of-day bucket (module docstring)."""
        st = self.state
        entries = (st.get("slots") or {}).get(str(slot))
        if not entries:
            return None
        oldest = today - self._days_kept
        first = int(st.get("first", now_s))
        bucket = self._bucket
        groups: list[Group] = []
        for day, w, s1, s2 in entries:
            if not oldest <= day < today:
                continue
            if self._zero_filled:  # windows without data in the bucket count as zeros
                start = day * DAY_S + slot * bucket
                w = max(w, (start + bucket - max(start, first)) // self._window)
            groups.append((int(w), float(s1), float(s2)))
        exp = _summarise(self._rate, groups, "seasonal")
        if exp is None or self._rate:
            return exp
        factor = _weekday_factor(st, today, first)
        if factor is None:
            return exp
        return Expectation(exp.mean * factor, exp.var * factor, exp.windows, exp.volume, "seasonal_weekly")

    def _rolling(self, now_s: int) -> Expectation | None:
        """The same statistics over the buckets of the span before the window: those that
        ended before it from ``_Closed``, the rest (the bucket still filling; with zero_fill
        the one the span's start cuts) derived now."""
        where = self._span_of(now_s)
        if where is None:
            return None
        buckets, lo, fixed, done, hi, first, cutoff = where
        bucket = self._roll_bucket
        closed = self._closed_of(buckets, fixed, done, first)
        live: list[Group] = []
        for i in (*range(lo, fixed), *range(done, hi)):
            start, w, s1, s2 = buckets[i]
            if self._zero_filled:
                w = max(w, (min(start + bucket, now_s) - max(start, first, cutoff)) // self._window)
            if w > 0:
                live.append((int(w), float(s1), float(s2)))
        if closed is None:
            return _summarise(self._rate, live, self._roll_source)
        if self._rate:  # rates are never zero-filled: ``live`` is the bucket still filling
            return self._rate_of(closed, live)
        if not live:
            return _robust(closed.means, closed.within_sorted(), closed.windows, self._roll_source)
        return _robust(
            closed.means + [_mean(g) for g in live],
            closed.within_sorted() + [_within(g) for g in live],
            closed.windows + sum(g[0] for g in live),
            self._roll_source,
        )

    def _span_of(self, now_s: int) -> tuple[list[list[Any]], int, int, int, int, int, int] | None:
        """The rolling buckets and where the span before ``now_s`` lies in them: (buckets, lo,
        fixed, done, hi, first, cutoff); None without buckets."""
        buckets: list[list[Any]] = self.state.get("roll") or []
        if not buckets:
            return None
        span, bucket = self._roll_span, self._roll_bucket
        cutoff = now_s - span
        first = int(self.state.get("first", now_s))
        # buckets[lo:hi] are in the span (end after the cutoff, start before now); of these,
        # buckets[fixed:done] ended before now and do not depend on now
        lo = bisect_right(buckets, cutoff - bucket, key=_START)
        hi = bisect_left(buckets, now_s, key=_START)
        done = max(lo, min(hi, bisect_right(buckets, now_s - bucket, key=_START)))
        fixed = lo
        if self._zero_filled and first < cutoff:  # the bucket the cutoff cuts counts from it
            fixed = min(done, max(lo, bisect_left(buckets, cutoff, key=_START)))
        return buckets, lo, fixed, done, hi, first, cutoff

    def _closed_of(self, buckets: list[list[Any]], fixed: int, done: int, first: int) -> _Closed | None:
        if fixed >= done:
            return None
        key = (int(buckets[fixed][0]), int(buckets[done - 1][0]), done - fixed, first)
        closed = self._closed
        if closed is not None and closed.key == key:
            return closed
        bucket = self._roll_bucket
        groups: list[Group] = []
        for start, w, s1, s2 in buckets[fixed:done]:
            if self._zero_filled:
                w = max(w, (start + bucket - max(start, first)) // self._window)
            if w > 0:
                groups.append((int(w), float(s1), float(s2)))
        if not groups:
            self._closed = None
            return None
        windows = sum(g[0] for g in groups)
        ordered = all(g[1] == g[1] for g in groups)
        if not self._rate:  # what _robust reads
            self._closed = closed = _Closed(
                key=key,
                last_start=key[1],
                groups=groups,
                windows=windows,
                means=sorted([g[1] / g[0] for g in groups]),  # _mean of each
                within=None,
                used=0,
                calls1=0.0,
                calls2=0.0,
                top=None,
                whole=False,
                ordered=ordered,
            )
            return closed
        used = [g for g in groups if g[2] > 0]  # what _rate_of reads
        calls1 = sum(g[1] for g in used)
        calls2 = sum(g[2] for g in used)
        whole = (
            all(g[1].is_integer() and g[2].is_integer() for g in used)
            and abs(calls1) < _EXACT
            and calls2 < _EXACT
        )
        self._closed = closed = _Closed(
            key=key,
            last_start=key[1],
            groups=groups,
            windows=windows,
            means=[],
            within=[],
            used=len(used),
            calls1=calls1,
            calls2=calls2,
            top=max(used, key=_share) if used else None,
            whole=whole,
            ordered=ordered,
        )
        return closed

    def _rate_of(self, closed: _Closed, live: list[Group]) -> Expectation | None:
        """``_summarise`` of a rate over the closed buckets then ``live``, from their sums.

        Rates sum counts (errors, calls): whole numbers, whose float sums are exact in any
        order, so totals less the left-out group equal the sum without it. Otherwise (a
        state not made by ``add``) the groups are summarised as they are."""
        live_used = [g for g in live if g[2] > 0]
        if not closed.whole or not all(g[1].is_integer() and g[2].is_integer() for g in live_used):
            return _summarise(True, closed.groups + live, self._roll_source)
        windows = closed.windows + sum(g[0] for g in live)
        used = closed.used + len(live_used)
        if used == 0:
            return None
        calls1 = closed.calls1 + sum(g[1] for g in live_used)
        calls2 = closed.calls2 + sum(g[2] for g in live_used)
        if abs(calls1) >= _EXACT or calls2 >= _EXACT:
            return _summarise(True, closed.groups + live, self._roll_source)
        if used >= 3:  # leave out the first group with the highest share, as max() picks it
            top = closed.top
            for g in live_used:
                if top is None or _share(g) > _share(top):
                    top = g
            assert top is not None
            calls1 -= top[1]
            calls2 -= top[2]
        volume = int(calls2)
        return Expectation(calls1 / volume, 0.0, windows, volume, self._roll_source)

    # -- writing --------------------------------------------------------------------------

    def add(self, window_start_s: int, obs: Observation) -> None:
        """Count one window into the baseline (after it was judged)."""
        if self._rate:
            s1, s2 = float(obs.count), float(obs.volume)
        else:
            s1 = obs.value
            s2 = s1 * s1
        # w1, w2: s1, s2 as ints when they are whole floats under 2**53, else None (_plus)
        w1 = int(s1) if type(s1) is float and s1.is_integer() and -_EXACT < s1 < _EXACT else None
        w2 = int(s2) if type(s2) is float and s2.is_integer() and -_EXACT < s2 < _EXACT else None
        st = self.state
        if "first" not in st:
            st["first"] = window_start_s
        self._dispersion = None
        if self._seasonal:
            today = window_start_s // DAY_S
            if (kept := self._slot) is not None and kept[1] != today:
                self._slot = None  # another day's data changed: its expectation goes
            # (``d[k] if k in d else d.setdefault(k, ...)``: setdefault without an empty container
            # made, and dropped, for every window)
            slots: dict[str, list[list[Any]]] = st["slots"] if "slots" in st else st.setdefault("slots", {})
            days: list[list[Any]] = st["days"] if "days" in st else st.setdefault("days", [])  # [day, windows, s1]
            if days and (day := days[-1])[0] == today:
                day[1] += 1
                day[2] = _plus(day[2], s1, w1)
            elif not days or days[-1][0] < today:
                days.append([today, 1, _sig(s1)])
                while len(days) > 8:
                    days.pop(0)
            key = str((window_start_s % DAY_S) // self._bucket)
            fresh = key not in slots
            entries = slots.setdefault(key, []) if fresh else slots[key]
            old = self._parts.pop(key, None)  # its days change
            if old is not None:
                self._stale[key] = old[1]  # to take out of the kept order
                self._dirty[key] = old[0]  # to derive again (its position)
            elif fresh:
                self._dirty[key] = len(slots) - 1  # a new bucket comes last in the slots
            if entries and (entry := entries[-1])[0] == today:
                _count(entry, s1, w1, s2, w2)  # the time-of-day bucket's entry for today
            else:
                entries.append([today, 1, _sig(s1), _sig(s2)])
                if len(entries) > 1 and entries[-2][0] > today:  # a day arriving late
                    entries.sort(key=_START)
            oldest = today - self._days_kept
            while entries and entries[0][0] < oldest:
                entries.pop(0)
        bucket = self._roll_bucket
        b = window_start_s - window_start_s % bucket
        if (closed := self._closed) is not None and b <= closed.last_start:
            self._closed = None  # a window late into a bucket already summarised
        # the rolling span: bucket b (its start) counts the window; buckets sorted by start
        buckets: list[list[Any]] = st["roll"] if "roll" in st else st.setdefault("roll", [])
        if buckets and (entry := buckets[-1])[0] == b:
            pass
        elif not buckets or buckets[-1][0] < b:
            entry = [b, 0, 0, 0]
            buckets.append(entry)
        else:
            found = [e for e in buckets if e[0] == b]  # an older window arriving late
            if found:
                entry = found[0]
            else:
                entry = [b, 0, 0, 0]
                buckets.append(entry)
                buckets.sort(key=_START)
        _count(entry, s1, w1, s2, w2)  # the rolling bucket's entry
        cutoff = window_start_s - self._roll_span
        if buckets[0][0] + bucket <= cutoff:  # the span moved past its oldest buckets
            drop = 1
            while drop < len(buckets) and buckets[drop][0] + bucket <= cutoff:
                drop += 1
            del buckets[:drop]


def _share(g: Group) -> float:
    return g[1] / g[2]
