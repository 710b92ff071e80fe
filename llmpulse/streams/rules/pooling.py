"""Low-traffic series judged on evidence: a window short of ``min_requests`` is pooled with
the windows before it (Google SRE workbook, alerting on low-traffic services: lengthen the
window until the sample means something).

Guarantee: a threshold rule on a rate, mean or percentile judges a series whose window
holds fewer than ``min_requests`` calls on the pooled sample of its latest windows, going
back at most ``pool_windows`` windows (a bounded span, kept in the rule's state, a few
numbers per window and O(pool_windows) work per window), as soon as that sample reaches
``min_requests``, with the same confidence bound as a single window. A window that holds
``min_requests`` on its own is judged alone. Only when even the whole span holds fewer
is the window not judged ("too little data"), which counts as clear.

It defends against two failures of judging 60 s windows alone on a model of ~10 calls a
minute: an incident whose minutes hold 9 calls each is never judged, and an alert that
fired on a minute of 10 resolves two minutes later "for too little data" in the middle
of its incident.

How windows pool (each window is kept as its volume ``n``, its value, and what its
bound needs):
- rates (error_rate, success_rate, intent_accuracy): exact, the counts add up;
- average latency: the n-weighted mean, and the pooled spread (the windows' own spreads,
  estimated from their quantiles as evidence.py does, plus the spread of their means);
- relevance: the n-weighted mean (its spread follows from the mean);
- percentiles: the n-weighted mean of the windows' quantiles, read at the rank the pooled
  n gives: an approximation (a quantile of a mixture is not the mean of the quantiles;
  close when the pooled windows are alike, as consecutive minutes of one series are).
Counts per window (calls per key), sums and measured figures (GPU, host) are not pooled:
their level is per window or their value is exact. Anomaly rules on rates (error_rate...)
pool the same way: the pooled share is tested against the baseline share with the pooled
calls (each window still enters the baseline on its own).

State (plain JSON, the rule's state key ``pool``; absent before the first window, so a
state stored before pooling existed needs no migration)::

    {"k": "latency_avg_ms/60",            # metric/window: another metric starts afresh
     "w": [[28333333, 7, 5284.1, 1210.5, null], ...]}
           # [window index (start / window), n, value, spread or null, quantile curve or null],
           # oldest first, only windows within the last pool_windows
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from llmpulse.schemas import WindowAggregate
from llmpulse.streams.rules.baseline import RATE_METRICS
from llmpulse.streams.rules.model import VOLUME_FIELD, AnomalyRule, ThresholdRule

State = dict[str, Any]
Curve = tuple[tuple[float, float], ...]

PERCENTILES: dict[str, float] = {
    "latency_p50_ms": 0.5,
    "latency_p95_ms": 0.95,
    "latency_p99_ms": 0.99,
    "ttft_p95_ms": 0.95,
}
POOLED_METRICS = RATE_METRICS | {"latency_avg_ms", "relevance_avg"} | frozenset(PERCENTILES)


class Sample(NamedTuple):
    """What a threshold judges: one window, or the pooled windows ending with it (a
    NamedTuple: immutable, and made for every window judged, cheaper than a frozen dataclass)."""

    n: int  # calls (judged feedbacks for kind feedback, samples for gpu and host)
    value: float
    sd: float | None = None  # latency_avg_ms: the spread of one call's latency
    curve: Curve | None = None  # percentiles: (rank, value) points, from (0, 0)
    windows: int = 1  # windows pooled (1: this window alone)
    span_s: int = 0  # seconds from the first pooled window's start to this window's end


def latency_sd(agg: WindowAggregate) -> float | None:
    """One call's latency spread, from the window's quantiles (the aggregate has no sum of
    squares): ``max((p95 - p50) / 1.645, (p99 - p50) / 2.326)``; for skewed latency it errs wide."""
    p50, p95, p99 = agg.latency_p50_ms, agg.latency_p95_ms, agg.latency_p99_ms
    if p50 is None or (p95 is None and p99 is None):
        return None
    cands = []
    if p95 is not None:
        cands.append((p95 - p50) / 1.645)
    if p99 is not None:
        cands.append((p99 - p50) / 2.326)
    return max(cands)


def quantile_curve(metric: str, agg: WindowAggregate) -> Curve | None:
    """The window's known quantiles as (rank, value) points from (0, 0); None without any."""
    if metric == "ttft_p95_ms":
        pts = [(0.95, agg.ttft_p95_ms)]
    else:
        pts = [(0.5, agg.latency_p50_ms), (0.95, agg.latency_p95_ms), (0.99, agg.latency_p99_ms)]
    known = tuple((q, float(v)) for q, v in pts if v is not None)
    if not known:
        return None
    return ((0.0, 0.0), *known)


def window_sample(rule: ThresholdRule, agg: WindowAggregate) -> Sample | None:
    """This window as a sample of the rule's metric; None when it has no value for it."""
    value = getattr(agg, rule.metric)
    if value is None:
        return None
    n = int(getattr(agg, VOLUME_FIELD[rule.kind]))
    m = rule.metric
    if m == "latency_avg_ms":
        return Sample(n, float(value), sd=latency_sd(agg))
    if m in PERCENTILES:
        return Sample(n, float(value), curve=quantile_curve(m, agg))
    return Sample(n, float(value))


def sample_to_judge(rule: ThresholdRule, agg: WindowAggregate, rst: State | None) -> Sample | None:
    """The sample a threshold judges for this window, or None (too little data, no value).

    ``rst`` is the rule's state for the series (mutated: this window joins its pool); None
    judges the window alone, as a rule without pooling does."""
    own = window_sample(rule, agg)
    floor = rule.min_requests
    if rst is None or floor <= 0 or rule.pool_windows <= 1 or rule.metric not in POOLED_METRICS:
        if floor > 0 and int(getattr(agg, VOLUME_FIELD[rule.kind])) < floor:
            return None
        return own
    return pooled(rule, agg, rst, own)


def pooled(
    rule: ThresholdRule | AnomalyRule, agg: WindowAggregate, rst: State, own: Sample | None,
    start_s: int | None = None,
) -> Sample | None:  # fmt: skip
    """``own`` (this window's sample) joins the series' pool in ``rst``; the sample to judge:
    ``own`` when it holds ``min_requests``, else the latest windows pooled until they do
    (within ``pool_windows``), else None. ``start_s``: ``round(agg.window_start.timestamp())``
    when the caller has it (the same for every aggregate of a window)."""
    floor = rule.min_requests
    if start_s is None:
        start_s = round(agg.window_start.timestamp())
    idx = start_s // rule.window
    key = f"{rule.metric}/{rule.window}"
    pool: State | None = rst.get("pool")
    if pool is None or pool.get("k") != key:
        pool = rst["pool"] = {"k": key, "w": []}
    oldest = idx - rule.pool_windows + 1
    kept: list[list[Any]] = [e for e in pool["w"] if oldest <= int(e[0]) < idx]
    if own is not None:
        kept.append([idx, own.n, own.value, own.sd, None if own.curve is None else [list(p) for p in own.curve]])
    pool["w"] = kept
    if own is None:
        return None
    if own.n >= floor:
        return own
    total = 0
    first = len(kept)
    while first > 0 and total < floor:
        first -= 1
        total += int(kept[first][1])
    if total < floor:
        return None
    return _merge(kept[first:], idx, rule.window)


def _merge(entries: list[list[Any]], idx: int, window: int) -> Sample:
    """Pooled windows as one sample (see the module docstring for how each part pools)."""
    n = sum(int(e[1]) for e in entries)
    weights = [int(e[1]) / n for e in entries]
    mean = sum(w * float(e[2]) for w, e in zip(weights, entries, strict=True))
    sd: float | None = None
    if all(e[3] is not None for e in entries):
        var = sum(
            w * (float(e[3]) ** 2 + (float(e[2]) - mean) ** 2)
            for w, e in zip(weights, entries, strict=True)
        )  # fmt: skip
        sd = math.sqrt(var)
    curve: Curve | None = None
    curves = [e[4] for e in entries]
    if all(c is not None for c in curves):
        ranks = [tuple(float(p[0]) for p in c) for c in curves]
        if all(r == ranks[0] for r in ranks):
            curve = tuple(
                (q, sum(w * float(c[j][1]) for w, c in zip(weights, curves, strict=True)))
                for j, q in enumerate(ranks[0])
            )  # fmt: skip
    span_s = (idx - int(entries[0][0]) + 1) * window
    return Sample(n, mean, sd=sd, curve=curve, windows=len(entries), span_s=span_s)
