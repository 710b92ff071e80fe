"""Baselines of anomaly rules, kept incrementally as plain JSON data.

Guarantee: the expected value of a window is robust and knows the time of day, and the
state per dimension set is bounded (O(1) work per window). It defends against the two
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
entries at most, the rolling hour 12.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmpulse.schemas import WindowAggregate
from llmpulse.streams.rules.model import DAY_S, VOLUME_FIELD, AnomalyRule
from llmpulse.streams.rules.stats import mad_sigma, median

State = dict[str, Any]
FALLBACK_SPAN_S = 3600
FALLBACK_BUCKET_S = 300
# rate metric -> (the count it is a share of the volume of), per aggregate
RATE_METRICS = frozenset({"error_rate", "success_rate", "intent_accuracy"})


@dataclass(frozen=True, slots=True)
class Observation:
    """One window's value, and for rates its count and volume."""

    value: float
    count: int = 0
    volume: int = 0


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
    if float(x).is_integer() and abs(x) < 2**53:
        return int(x)
    return float(f"{x:.7g}")


def _parts(rule: AnomalyRule, obs: Observation) -> tuple[float, float]:
    if rule.metric in RATE_METRICS:
        return float(obs.count), float(obs.volume)
    return obs.value, obs.value * obs.value


def expected(rule: AnomalyRule, st: State, window_start_s: int) -> Expectation | None:
    """The baseline of the window starting at ``window_start_s``; None without history."""
    if rule.method == "seasonal":
        seasonal = _seasonal(rule, st, window_start_s)
        if seasonal is not None:
            return seasonal
        return _rolling(rule, st, window_start_s, FALLBACK_SPAN_S, _fallback_bucket(rule), True)
    return _rolling(rule, st, window_start_s, rule.baseline_s, rule.bucket_s, False)


def add(rule: AnomalyRule, st: State, window_start_s: int, obs: Observation) -> None:
    """Count one window into the baseline (after it was judged)."""
    s1, s2 = _parts(rule, obs)
    st.setdefault("first", window_start_s)
    if rule.method == "seasonal":
        _seasonal_add(rule, st, window_start_s, s1, s2)
        _roll_add(st, window_start_s, s1, s2, FALLBACK_SPAN_S, _fallback_bucket(rule))
    else:
        _roll_add(st, window_start_s, s1, s2, rule.baseline_s, rule.bucket_s)


def _fallback_bucket(rule: AnomalyRule) -> int:
    b = max(rule.window, FALLBACK_BUCKET_S)
    return b - b % rule.window


def _summarise(
    rule: AnomalyRule, groups: list[tuple[int, float, float]], source: str
) -> Expectation | None:
    """Median over groups (days or buckets) of (windows, s1, s2)."""
    groups = [g for g in groups if g[0] > 0]
    if not groups:
        return None
    windows = sum(g[0] for g in groups)
    if rule.metric in RATE_METRICS:
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
    means = [g[1] / g[0] for g in groups]
    within = [max(0.0, g[2] / g[0] - (g[1] / g[0]) ** 2) * g[0] / max(1, g[0] - 1) for g in groups]
    var = median(within) + mad_sigma(means) ** 2
    return Expectation(median(means), var, windows, 0, source)


# -- seasonal ---------------------------------------------------------------------------


def _slot(rule: AnomalyRule, window_start_s: int) -> tuple[str, int, int]:
    day, sec = divmod(window_start_s, DAY_S)
    slot = sec // rule.bucket_s
    return str(slot), day, day * DAY_S + slot * rule.bucket_s


def _seasonal(rule: AnomalyRule, st: State, now_s: int) -> Expectation | None:
    key, today, _ = _slot(rule, now_s)
    entries = (st.get("slots") or {}).get(key)
    if not entries:
        return None
    oldest = today - rule.baseline_s // DAY_S
    first = int(st.get("first", now_s))
    groups: list[tuple[int, float, float]] = []
    for day, w, s1, s2 in entries:
        if not oldest <= day < today:
            continue
        if rule.zero_filled:  # windows without data in the bucket count as zeros
            start = day * DAY_S + int(key) * rule.bucket_s
            w = max(w, (start + rule.bucket_s - max(start, first)) // rule.window)
        groups.append((int(w), float(s1), float(s2)))
    exp = _summarise(rule, groups, "seasonal")
    if exp is None or rule.metric in RATE_METRICS:
        return exp
    factor = _weekday_factor(st, today, first)
    if factor is None:
        return exp
    return Expectation(exp.mean * factor, exp.var * factor, exp.windows, exp.volume, "seasonal_weekly")


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
    window's effect already passed the factor (the engine asks lazily).
    """
    parts: list[tuple[float, float, float]] = []  # (ratio, variance x dof, mean x dof)
    for entries in (st.get("slots") or {}).values():
        for _, w, s1, s2 in entries:
            if w >= 3 and s1 > 0:
                mean = s1 / w
                var = max(0.0, s2 / w - mean * mean) * w / (w - 1)
                parts.append((var / mean, var * (w - 1), mean * (w - 1)))
    if not parts:
        return 0.0
    parts.sort(key=lambda p: p[0])
    kept = parts[: max(1, len(parts) - len(parts) // 10)]
    total_mean = sum(p[2] for p in kept)
    return sum(p[1] for p in kept) / total_mean if total_mean > 0 else 0.0


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


def _seasonal_add(rule: AnomalyRule, st: State, window_start_s: int, s1: float, s2: float) -> None:
    slots: dict[str, list[list[Any]]] = st.setdefault("slots", {})
    key, today, _ = _slot(rule, window_start_s)
    days: list[list[Any]] = st.setdefault("days", [])  # [day, windows, s1]: the weekday level
    if days and days[-1][0] == today:
        days[-1][1] += 1
        days[-1][2] = _sig(days[-1][2] + s1)
    elif not days or days[-1][0] < today:
        days.append([today, 1, _sig(s1)])
        while len(days) > 8:
            days.pop(0)
    entries = slots.setdefault(key, [])
    if entries and entries[-1][0] == today:
        entries[-1][1] += 1
        entries[-1][2] = _sig(entries[-1][2] + s1)
        entries[-1][3] = _sig(entries[-1][3] + s2)
    else:
        entries.append([today, 1, _sig(s1), _sig(s2)])
        entries.sort(key=lambda e: e[0])
    oldest = today - rule.baseline_s // DAY_S
    while entries and entries[0][0] < oldest:
        entries.pop(0)


# -- rolling ----------------------------------------------------------------------------


def _rolling(
    rule: AnomalyRule, st: State, now_s: int, span_s: int, bucket_s: int, fallback: bool
) -> Expectation | None:
    buckets: list[list[Any]] = st.get("roll") or []
    cutoff = now_s - span_s
    first = int(st.get("first", now_s))
    groups: list[tuple[int, float, float]] = []
    for start, w, s1, s2 in buckets:
        if start + bucket_s <= cutoff or start >= now_s:
            continue
        if rule.zero_filled:
            lo = max(start, first, cutoff)
            w = max(w, (min(start + bucket_s, now_s) - lo) // rule.window)
        groups.append((int(w), float(s1), float(s2)))
    return _summarise(rule, groups, "rolling_fallback" if fallback else "rolling")


def _roll_add(
    st: State, window_start_s: int, s1: float, s2: float, span_s: int, bucket_s: int
) -> None:
    b = window_start_s - window_start_s % bucket_s
    buckets: list[list[Any]] = st.setdefault("roll", [])
    if buckets and buckets[-1][0] == b:
        entry = buckets[-1]
    else:
        found = [e for e in buckets if e[0] == b]  # an older window arriving late
        if found:
            entry = found[0]
        else:
            entry = [b, 0, 0, 0]
            buckets.append(entry)
            buckets.sort(key=lambda e: e[0])
    entry[1] += 1
    entry[2] = _sig(entry[2] + s1)
    entry[3] = _sig(entry[3] + s2)
    cutoff = window_start_s - span_s
    drop = 0
    while drop < len(buckets) and buckets[drop][0] + bucket_s <= cutoff:
        drop += 1
    if drop:
        del buckets[:drop]
