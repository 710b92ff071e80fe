"""Incremental baselines for anomaly rules, kept as plain JSON data.

Rolling: a ring of buckets ``[bucket_start_s, sum, windows]`` covering the baseline span
before the current window, plus running totals. Each window adds its value to the last
bucket; buckets older than the span are dropped. The mean is ``sum / windows`` (with
zero fill: ``sum / windows elapsed``, so that windows without data count as zeros).
The span covered is the baseline span rounded up to whole buckets.

Seasonal: per time-of-day bucket, one ``[day, sum, windows]`` entry for each of the last
``days`` UTC days. The baseline of a window is the mean over previous days of the same
time-of-day bucket, so a daily peak is compared with earlier peaks, not with the day.

Nothing is recomputed from history: each window costs O(1) (plus O(buckets) when a
bucket is dropped, once per bucket span).
"""

from __future__ import annotations

from typing import Any

from llmpulse.streams.rules.model import DAY_S, AnomalyRule

State = dict[str, Any]


def new_baseline() -> State:
    return {}


def baseline_of(rule: AnomalyRule, st: State, window_start_s: int) -> tuple[float, int] | None:
    """(mean, windows) of the baseline before ``window_start_s``; None without any data."""
    if rule.method == "seasonal":
        return _seasonal_mean(rule, st, window_start_s)
    return _rolling_mean(rule, st, window_start_s)


def add_to_baseline(rule: AnomalyRule, st: State, window_start_s: int, value: float) -> None:
    if rule.method == "seasonal":
        _seasonal_add(rule, st, window_start_s, value)
    else:
        _rolling_add(rule, st, window_start_s, value)


# -- rolling ----------------------------------------------------------------------------


def _rolling_evict(rule: AnomalyRule, st: State, now_s: int) -> None:
    buckets: list[list[Any]] = st.get("buckets") or []
    bucket_s = rule.bucket_s
    cutoff = now_s - rule.baseline
    drop = 0
    while drop < len(buckets) and buckets[drop][0] + bucket_s <= cutoff:
        drop += 1
    if drop:
        del buckets[:drop]
        st["sum"] = float(sum(b[1] for b in buckets))
        st["n"] = int(sum(b[2] for b in buckets))


def _rolling_mean(rule: AnomalyRule, st: State, now_s: int) -> tuple[float, int] | None:
    if not st.get("buckets"):
        return None
    _rolling_evict(rule, st, now_s)
    buckets = st["buckets"]
    if not buckets:
        return None
    total: float = st["sum"]
    n: int = st["n"]
    if rule.zero_filled:
        covered_from = max(int(st["first"]), int(buckets[0][0]))
        n = max(n, (now_s - covered_from) // rule.window)
    if n <= 0:
        return None
    return total / n, n


def _rolling_add(rule: AnomalyRule, st: State, window_start_s: int, value: float) -> None:
    bucket_s = rule.bucket_s
    b = window_start_s - window_start_s % bucket_s
    buckets: list[list[Any]] = st.setdefault("buckets", [])
    if "first" not in st:
        st["first"] = window_start_s
        st["sum"] = 0.0
        st["n"] = 0
    if buckets and buckets[-1][0] == b:
        buckets[-1][1] += value
        buckets[-1][2] += 1
    else:
        for entry in buckets:  # an older window arriving late: find its bucket
            if entry[0] == b:
                entry[1] += value
                entry[2] += 1
                break
        else:
            buckets.append([b, value, 1])
            buckets.sort(key=lambda e: e[0])
    st["sum"] += value
    st["n"] += 1
    _rolling_evict(rule, st, window_start_s)


# -- seasonal ---------------------------------------------------------------------------


def _seasonal_slot(rule: AnomalyRule, window_start_s: int) -> tuple[str, int, int]:
    day, sec = divmod(window_start_s, DAY_S)
    slot = sec // rule.bucket_s
    return str(slot), day, day * DAY_S + slot * rule.bucket_s


def _seasonal_mean(rule: AnomalyRule, st: State, now_s: int) -> tuple[float, int] | None:
    slots: dict[str, list[list[Any]]] = st.get("slots") or {}
    key, today, _ = _seasonal_slot(rule, now_s)
    entries = slots.get(key)
    if not entries:
        return None
    oldest = today - rule.baseline // DAY_S
    total = 0.0
    n = 0
    first = int(st.get("first", 0))
    for day, s, count in entries:
        if oldest <= day < today:
            total += s
            if rule.zero_filled:
                start = day * DAY_S + int(key) * rule.bucket_s
                count = max(count, (start + rule.bucket_s - max(start, first)) // rule.window)
            n += count
    if n <= 0:
        return None
    return total / n, n


def _seasonal_add(rule: AnomalyRule, st: State, window_start_s: int, value: float) -> None:
    slots: dict[str, list[list[Any]]] = st.setdefault("slots", {})
    if "first" not in st:
        st["first"] = window_start_s
    key, today, _ = _seasonal_slot(rule, window_start_s)
    entries = slots.setdefault(key, [])
    if entries and entries[-1][0] == today:
        entries[-1][1] += value
        entries[-1][2] += 1
    else:
        entries.append([today, value, 1])
        entries.sort(key=lambda e: e[0])
    oldest = today - rule.baseline // DAY_S
    while entries and entries[0][0] < oldest:
        entries.pop(0)
