"""Judging a window on the evidence: thresholds with confidence, anomalies with a test.

Guarantee: a threshold on a rate, mean or percentile fires only when the window's own
data show the breach at the rule's ``confidence``; an anomaly fires only when the effect
is at least the rule's factor AND a test suited to the metric finds the window unlikely
under its baseline: p below ``(1 - confidence) x window / 1 day``, so that a series with
usual traffic, judged 1,440 times a day, raises a false anomaly on fewer than 1% of
days. It defends against the commonest false alert: one failed call among twenty reads
as 95% success, below a 99% target, yet is what a 99% service does 18% of the time.

Thresholds, by metric:
- rates (error_rate, success_rate, intent_accuracy): exact one-sided binomial test of the
  window's count against the level (the number of calls is ``requests``; for intent
  accuracy ``feedback_count``, as the aggregate does not carry the judged count);
- latency_avg_ms: a normal bound on the mean, ``avg -/+ z sd / sqrt(n)``. The aggregate
  carries no sum of squares, so ``sd`` is estimated from its quantiles,
  ``max((p95 - p50) / 1.645, (p99 - p50) / 2.326)`` (for skewed latency this errs wide);
- relevance_avg: the same bound with the largest spread a 0..5 score with that mean can
  have (Bhatia-Davis: ``sd^2 <= (5 - m) m``);
- percentiles: the distribution-free order-statistic bound: the q-quantile is above the
  level with confidence when the sample quantile at rank ``q - z sqrt(q (1 - q) / n)`` is,
  read off the window's p50/p95/p99 by linear interpolation (from 0 at rank 0);
- counts per window (requests per key, errors): a rate of calls a window, so an exact
  Poisson test of the count against the level (a key averaging 90 calls a minute shows
  106 in some minute; 130 against 100 is P = 0.002);
- sums and GPU/host figures (tokens, cost, GPU utilisation): the window's value is the
  measured quantity itself, not an estimate: judged as is.
Without the data for a bound (no quantiles), the point value is judged. A window with
fewer than ``min_requests`` calls is judged on the pooled sample of the series' latest
windows, up to ``pool_windows`` of them (pooling.py), with the same bounds and the pooled n.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from llmpulse.schemas import WindowAggregate
from llmpulse.streams.rules.baseline import RATE_METRICS, Expectation, Observation
from llmpulse.streams.rules.model import (
    SEVERITY_RANK,
    VOLUME_FIELD,
    AnomalyRule,
    Severity,
    ThresholdRule,
)
from llmpulse.streams.rules.pooling import (
    PERCENTILES,
    Curve,
    Sample,
    sample_to_judge,
    window_sample,
)
from llmpulse.streams.rules.stats import (
    betabinom_cdf,
    betabinom_sf,
    binom_cdf,
    binom_sf,
    count_cdf,
    count_sf,
    norm_quantile,
    norm_sf,
    poisson_cdf,
    poisson_sf,
    t_quantile,
    wilson_bounds,
)

Evidence = dict[str, str | float]
COUNT_METRICS = frozenset({"requests", "errors", "unpriced_requests", "feedback_count", "samples"})
SUM_METRICS = frozenset({"cost_usd", "prompt_tokens", "completion_tokens", "total_tokens"})
# threshold metrics judged with a confidence bound (the rest: the point value, as measured)
ON_EVIDENCE = RATE_METRICS | COUNT_METRICS | frozenset(PERCENTILES) | {"latency_avg_ms", "relevance_avg"}
_Z_CACHE: dict[float, float] = {}


def z_of(confidence: float) -> float:
    """The one-sided normal quantile of ``confidence`` (cached: rules reuse a few values)."""
    z = _Z_CACHE.get(confidence)
    if z is None:
        z = _Z_CACHE[confidence] = norm_quantile(confidence)
    return z


class Verdict:
    """One rule's judgement of one window, with what a person needs to check it."""

    __slots__ = (
        "baseline", "evidence", "expected_high", "expected_low", "inconclusive", "judged",
        "level", "threshold", "value",
    )  # fmt: skip

    def __init__(
        self,
        level: Severity | None,
        value: float | None,
        threshold: float | None,
        baseline: float | None = None,
        judged: bool = True,
        expected_low: float | None = None,
        expected_high: float | None = None,
        evidence: Evidence | None = None,
    ) -> None:
        self.level = level
        self.value = value
        self.threshold = threshold
        self.baseline = baseline
        self.judged = judged
        self.expected_low = expected_low
        self.expected_high = expected_high
        self.evidence: Evidence = evidence or {}
        # The point value is past a level but the window's data do not show the breach
        # with the rule's confidence: not evidence to fire on, and not evidence of
        # recovery either, so a firing alert holds (see lifecycle.advance's `hold`).
        self.inconclusive = False

    def held(self) -> Verdict:
        """This verdict, marked inconclusive."""
        self.inconclusive = True
        return self


# -- thresholds ---------------------------------------------------------------------------


def _rate_test(
    k: int, n: int, level: float, above: bool, alpha: float
) -> tuple[bool, float]:
    """(breach, p-value): exact binomial, H0: the true share is at the level."""
    p = binom_sf(k, n, level) if above else binom_cdf(k, n, level)
    return p < alpha, p


def _interp(curve: Curve, q: float) -> float:
    if q <= curve[0][0]:
        return curve[0][1]
    for (q0, v0), (q1, v1) in itertools.pairwise(curve):
        if q <= q1:
            return v0 + (v1 - v0) * (q - q0) / (q1 - q0)
    return curve[-1][1]  # beyond the highest known rank: the highest known value


def _bound(rule: ThresholdRule, s: Sample, z: float) -> tuple[float, Evidence] | None:
    """The one-sided confidence bound of the metric on the side that must clear the level."""
    above = rule.direction == "above"
    m = rule.metric
    n = s.n
    if m in PERCENTILES:
        if s.curve is None or n <= 0:
            return None
        q = PERCENTILES[m]
        shift = z * math.sqrt(q * (1 - q) / n)
        rank = max(0.0, q - shift) if above else min(1.0, q + shift)
        return _interp(s.curve, rank), {"n": n, "rank": round(rank, 4)}
    if m == "latency_avg_ms":
        sd = s.sd
    elif m == "relevance_avg":
        sd = math.sqrt(max(0.0, (5.0 - s.value) * s.value))
    else:
        return None
    if sd is None or n <= 0:
        return None
    se = sd / math.sqrt(n)
    return (s.value - z * se if above else s.value + z * se), {"n": n, "sd": round(sd, 4)}


def judge_threshold(rule: ThresholdRule, agg: WindowAggregate, rst: dict[str, Any] | None = None) -> Verdict:
    """One window's verdict. ``rst``: the rule's state for the series, which pools a window
    short of ``min_requests`` with the ones before it (pooling.py); None judges it alone."""
    shown = rule.warning if rule.warning is not None else rule.critical
    sample = sample_to_judge(rule, agg, rst)
    if sample is None:
        return Verdict(None, None, shown, judged=False)
    verdict = _judge_sample(rule, sample, shown)
    if sample.windows > 1:  # the span judged, for a person to check
        alone = _judged_alone(rule, agg, shown)
        if alone is not None and more_severe(alone, verdict):
            return alone
        verdict.evidence["windows"] = sample.windows
        verdict.evidence["span_s"] = sample.span_s
    return verdict


ALONE_MIN = 3
"""Calls a window short of ``min_requests`` needs to fire on its own evidence (see below)."""


def more_severe(alone: Verdict, pooled: Verdict) -> bool:
    """Whether a short window judged alone fires above its pooled verdict (it only ever
    fires or escalates, never clears)."""
    return alone.level is not None and (
        pooled.level is None or SEVERITY_RANK[alone.level] > SEVERITY_RANK[pooled.level]
    )


def _judged_alone(rule: ThresholdRule, agg: WindowAggregate, shown: float | None) -> Verdict | None:
    """A short window judged on its own calls, with a small-sample bound, or None.

    Pooling supplies evidence a short window lacks; it must not dilute evidence the window
    has. The first minute of an incident on a quiet model, pooled with the calm minutes
    before it, was judged as their average: 4 calls at 6-10 s against a 2 s target read as
    9 calls averaging 3.7 s, and the page came a minute late. So a window of at least
    ``ALONE_MIN`` calls that breaches on its own calls fires on them: rates and percentiles
    with their exact and distribution-free bounds (valid at any n), means with Student's t
    at n - 1 degrees of freedom instead of the normal z (4.54 for 0.99 and 4 calls, not
    2.33). Only a breach counts: a short window alone never clears or resolves anything."""
    own = window_sample(rule, agg)
    if own is None or own.n < ALONE_MIN:
        return None
    if rule.metric == "latency_avg_ms" and not own.sd:
        # a few calls within one bucket of the latency sketch read as no spread at all: not
        # evidence (3 calls of 2.1 s fired as "bound 2,118" on a quiet model's ordinary night)
        return None
    verdict = _judge_sample(rule, own, shown, small=True)
    verdict.evidence["small_sample"] = "true"
    return verdict


def _judge_sample(rule: ThresholdRule, sample: Sample, shown: float | None, small: bool = False) -> Verdict:
    v = sample.value
    above = rule.direction == "above"
    levels: list[tuple[Severity, float]] = []
    if rule.critical is not None:
        levels.append(("critical", rule.critical))
    if rule.warning is not None:
        levels.append(("warning", rule.warning))
    band: tuple[float | None, float | None] = (None, shown) if above else (shown, None)
    conf = rule.confidence
    if conf is None or rule.kind in ("gpu", "host") or rule.metric not in ON_EVIDENCE:
        for sev, lvl in levels:
            if (v > lvl) if above else (v < lvl):
                return Verdict(sev, v, lvl, None, True, *band)
        return Verdict(None, v, shown, None, True, *band)
    alpha = 1.0 - conf
    if rule.metric in RATE_METRICS:
        n = sample.n
        k = round(v * n)
        ev: Evidence = {"n": n, "count": k, "confidence": conf}
        for sev, lvl in levels:
            if not ((v > lvl) if above else (v < lvl)):
                continue
            breach, p = _rate_test(k, n, lvl, above, alpha)
            if breach:
                lo, hi = wilson_bounds(k, n, z_of(conf))
                ev.update({"p_value": p, "bound": lo if above else hi})
                return Verdict(sev, v, lvl, None, True, *band, evidence=ev)
        return _clear_or_held(v, levels, above, Verdict(None, v, shown, None, True, *band, evidence=ev))
    if rule.metric in COUNT_METRICS:
        k = round(v)
        ev = {"count": k, "confidence": conf}
        for sev, lvl in levels:
            if not ((v > lvl) if above else (v < lvl)):
                continue
            p = poisson_sf(k, lvl) if above else poisson_cdf(k, lvl)
            if p < alpha:
                ev["p_value"] = p
                return Verdict(sev, v, lvl, None, True, *band, evidence=ev)
        return _clear_or_held(v, levels, above, Verdict(None, v, shown, None, True, *band, evidence=ev))
    z = z_of(conf)
    if small and rule.metric in ("latency_avg_ms", "relevance_avg") and sample.n >= 2:
        z = t_quantile(conf, sample.n - 1)  # the spread itself is estimated from these few calls
    bound = _bound(rule, sample, z)
    if bound is None:  # no spread to bound with: the point value
        for sev, lvl in levels:
            if (v > lvl) if above else (v < lvl):
                return Verdict(sev, v, lvl, None, True, *band)
        return Verdict(None, v, shown, None, True, *band)
    b, ev = bound
    ev.update({"bound": round(b, 6), "confidence": conf})
    for sev, lvl in levels:
        if (b > lvl) if above else (b < lvl):
            return Verdict(sev, v, lvl, None, True, *band, evidence=ev)
    return _clear_or_held(v, levels, above, Verdict(None, v, shown, None, True, *band, evidence=ev))


def _clear_or_held(v: float, levels: list[tuple[Severity, float]], above: bool, verdict: Verdict) -> Verdict:
    """A window without evidence of a breach: clear if its point value is within every level,
    else inconclusive. Firing needs evidence of the breach and resolving needs the point value
    back within target: without that hysteresis a rate hovering just past its level, whose
    windows are alternately significant and not, fired and resolved by turns (and an action
    tied to the alert, such as a rate limit, was lifted and re-applied with a fresh budget)."""
    if any((v > lvl) if above else (v < lvl) for _, lvl in levels):
        return verdict.held()
    return verdict


# -- anomalies ----------------------------------------------------------------------------


def anomaly_test(
    rule: AnomalyRule, obs: Observation, exp: Expectation, agg: WindowAggregate
) -> tuple[float, float, float, Evidence]:
    """(p-value, expected_low, expected_high, evidence) of ``obs`` under ``exp``.

    counts: negative binomial with the baseline's variance (Poisson when it is not
    overdispersed); rates: beta-binomial, the binomial of the window with the baseline
    share's own uncertainty (Jeffreys: Beta(errors + 1/2, calls - errors + 1/2));
    sums (cost, tokens): a scaled Poisson (the sum in units of its dispersion ``var /
    mean``, at least the series' typical dispersion over all its history; this window's
    cost of one call while the history shows no spread), whose right tail is as skewed as a
    compound sum of few calls; the rest: a normal tail. Until a day of history exists the
    spread of counts, sums and the rest is doubled (``rolling_fallback``); a rate's
    beta-binomial already widens with a young baseline's few calls.
    """
    above = rule.direction == "above"
    z = z_of(1.0 - rule.alpha)
    widen = 2.0 if exp.wide else 1.0
    ev: Evidence = {"history": exp.source, "baseline_windows": exp.windows}
    if rule.metric in RATE_METRICS:
        n = obs.volume
        k = obs.count
        # the baseline share is itself an estimate (from exp.volume calls): beta-binomial with
        # Jeffreys' Beta(errors + 1/2, rest + 1/2), which already carries the uncertainty of a
        # young baseline (few calls); a share has no daily curve to fear in a rolling hour, so
        # its weight is not cut during the first day (cut to a quarter, 4 errors in 13 calls
        # against 0.7% read as p = 3e-5 and a low-traffic model's error burst went unseen)
        base_k = exp.mean * exp.volume
        a = base_k + 0.5
        b = exp.volume - base_k + 0.5
        p = betabinom_sf(k, n, a, b) if above else betabinom_cdf(k, n, a, b)
        share = a / (a + b)
        sd = math.sqrt(share * (1 - share) / n + share * (1 - share) / (a + b + 1))
        ev.update({"test": "beta_binomial", "n": n, "count": k, "p_value": p, "baseline_calls": exp.volume})
        return p, max(0.0, share - z * sd), min(1.0, share + z * sd), ev
    mean = exp.mean
    # the baseline is an estimate of today's level from other days: a usual day strays from it
    # by about baseline_cv of it (traffic grows, a launch, a holiday), which one or a few past
    # days cannot show in their spread (the MAD of one day is 0)
    var = exp.var + (rule.baseline_cv * mean) ** 2
    if rule.metric in COUNT_METRICS:
        var = max(var, mean) * widen * widen
        k = round(obs.value)
        p = count_sf(k, mean, var) if above else count_cdf(k, mean, var)
        test = "poisson" if var <= mean * (1 + 1e-9) else "negative_binomial"
        ev.update({"count": k})
    elif rule.metric in SUM_METRICS and mean > 0:
        # a sum of calls' costs or tokens is right-skewed (few calls, mixed models): a scaled
        # (quasi-)Poisson with dispersion c = var / mean, at least one call's size
        # under the baseline a call costs what it used to: the history's dispersion, not this
        # window's (a 5x larger call is the spike being tested); one call of this window
        # only while the history shows no spread at all
        c = max(var / mean, exp.dispersion)
        if c <= 0:
            c = obs.value / max(1, agg.requests)
        c = max(c, 1e-12) * widen * widen
        var = c * mean
        k = int(obs.value / c)
        p = poisson_sf(k, mean / c) if above else poisson_cdf(k + 1, mean / c)
        test = "scaled_poisson"
        ev.update({"dispersion": c})
    else:
        var = max(var, (0.01 * mean) ** 2) * widen * widen
        test = "normal"
        sd = math.sqrt(var)
        if sd <= 0:
            p = 0.0 if (obs.value > mean if above else obs.value < mean) else 1.0
        else:
            p = norm_sf((obs.value - mean) / sd) if above else norm_sf((mean - obs.value) / sd)
    sd = math.sqrt(var)
    ev.update({"test": test, "p_value": p, "sd": round(sd, 6)})
    return p, max(0.0, mean - z * sd), mean + z * sd, ev


def short_of_calls(rule: AnomalyRule, agg: WindowAggregate, pooled: bool) -> bool:
    """Too few calls to judge: the window holds fewer than ``min_requests``, and ``obs`` is
    not a sample pooled up to them (pooling.py)."""
    return not pooled and rule.min_requests > 0 and getattr(agg, VOLUME_FIELD[rule.kind]) < rule.min_requests


def below_effect(rule: AnomalyRule, value: float, limit: float) -> bool:
    """Direction above: ``value`` shows no effect, being under ``min_value`` or under
    ``limit`` (``factor`` x the expected mean, or x a floor under it)."""
    return value < rule.min_value or value < limit


def cannot_breach(
    rule: AnomalyRule,
    obs: Observation,
    agg: WindowAggregate,
    pooled: bool = False,
    mean_floor: float | Callable[[], float | None] | None = None,
) -> bool:
    """Whether ``judge_anomaly(rule, obs, exp, agg, pooled=pooled)`` finds no anomaly for
    any ``exp`` (whose mean is at least ``mean_floor``, when given; a callable is asked only
    once the other conditions leave it open): too few calls to judge (``short_of_calls``),
    or, direction above, no effect (``below_effect``) even against the floor. judge_anomaly
    decides with the same two functions, so the two cannot drift apart. The engine then
    leaves the expectation of a series with no alert open underived (nothing reads a clear
    verdict's figures but the words of a resolution), the commonest case (on sparse traffic
    a key's minute of a few calls is under every shipped ``min_value``, most minutes hold no
    error, and an effect is rare)."""
    if short_of_calls(rule, agg, pooled):
        return True
    if rule.direction != "above":
        return False
    if obs.value < rule.min_value:
        return True
    floor = mean_floor() if callable(mean_floor) else mean_floor
    return floor is not None and below_effect(rule, obs.value, floor * rule.factor)


def judge_anomaly(
    rule: AnomalyRule,
    obs: Observation,
    exp: Expectation | None,
    agg: WindowAggregate,
    dispersion: Callable[[], float] | None = None,
    pooled: bool = False,
) -> Verdict:
    """``dispersion``: the series' dispersion for sums, asked only once the effect passed;
    ``pooled``: ``obs`` is a rate pooled over windows up to ``min_requests`` (pooling.py)."""
    v = obs.value
    if exp is None or exp.windows < rule.min_baseline_windows or short_of_calls(rule, agg, pooled):
        return Verdict(None, v, None, None if exp is None else exp.mean, judged=False)
    mean = exp.mean
    above = rule.direction == "above"
    if above:
        limit = mean * rule.factor
        effect = not below_effect(rule, v, limit) and v > mean  # cannot_breach's test
    else:
        limit = mean / rule.factor
        effect = v <= limit and v < mean and mean >= rule.min_value
    if not effect:  # the baseline it was judged on, for the words of a resolution
        return Verdict(None, v, limit, mean, evidence={"history": exp.source, "baseline_windows": exp.windows})
    if dispersion is not None and rule.metric in SUM_METRICS:
        exp = replace(exp, dispersion=dispersion())
    p, lo, hi, ev = anomaly_test(rule, obs, exp, agg)
    ev["alpha"] = rule.alpha
    ratio = v / mean if mean else math.inf
    ev["ratio"] = round(ratio, 4) if math.isfinite(ratio) else "inf"
    if p >= rule.alpha:
        # the effect without the evidence (a few calls at 20% errors against 0.4%): no reason
        # to fire, and no recovery either, so a firing alert holds (as thresholds do); judged
        # clear, a low-traffic model's error burst fired and resolved by turns (6 messages)
        return Verdict(None, v, limit, mean, True, lo, hi, ev).held()
    cf = rule.critical_factor
    if cf is not None and (v > mean * cf if above else v < mean / cf):
        return Verdict("critical", v, mean * cf if above else mean / cf, mean, True, lo, hi, ev)
    return Verdict(rule.severity, v, limit, mean, True, lo, hi, ev)


def rounded(ev: dict[str, Any]) -> dict[str, str | float]:
    """Evidence as stored: floats to 6 significant digits (p-values keep their exponent)."""
    out: dict[str, str | float] = {}
    for k, val in ev.items():
        if isinstance(val, bool):
            out[k] = str(val).lower()
        elif isinstance(val, (int, float)):
            out[k] = float(f"{float(val):.6g}")
        else:
            out[k] = str(val)
    return out
