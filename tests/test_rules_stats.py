"""The statistics behind the rules, on cases worked out by hand (issue 14)."""

from __future__ import annotations

import math
import random
from datetime import timedelta

import pytest

from llmpulse.streams.rules import RulesEngine, load_rules
from llmpulse.streams.rules.stats import (
    betabinom_sf,
    binom_cdf,
    binom_sf,
    count_sf,
    mad_sigma,
    median,
    norm_quantile,
    poisson_cdf,
    poisson_sf,
    wilson_bounds,
)
from tests.rules_helpers import T0, Runner, agg, calls, engine

SUCCESS_99 = """
rules:
  - name: success
    metric: success_rate
    direction: below
    warning: 0.99
    critical: 0.95
    by: [model]
    min_requests: 20
"""
GPT = {"model": "gpt-4o"}


def test_poisson_tails_at_known_values() -> None:
    # P(X >= 5 | lambda = 1) = 1 - e^-1 (1 + 1 + 1/2 + 1/6 + 1/24) = 1 - 0.367879 x 2.708333 = 0.0036599
    assert poisson_sf(5, 1.0) == pytest.approx(1 - math.exp(-1) * (1 + 1 + 1 / 2 + 1 / 6 + 1 / 24), rel=1e-12)
    assert poisson_sf(5, 1.0) == pytest.approx(0.0036599, abs=1e-7)
    # P(X >= 1 | lambda) = 1 - e^-lambda; at lambda = 0.5: 0.3934693
    assert poisson_sf(1, 0.5) == pytest.approx(1 - math.exp(-0.5), rel=1e-12)
    # P(X <= 2 | lambda = 3) = e^-3 (1 + 3 + 9/2) = 0.0497871 x 8.5 = 0.4231901
    assert poisson_cdf(2, 3.0) == pytest.approx(math.exp(-3) * 8.5, rel=1e-12)
    # P(X >= 10 | lambda = 2) = 1 - e^-2 sum_{i<10} 2^i / i! = 4.6498e-5 (the exact finite sum)
    exact = 1 - math.exp(-2) * sum(2**i / math.factorial(i) for i in range(10))
    assert poisson_sf(10, 2.0) == pytest.approx(exact, rel=1e-9)
    assert poisson_sf(10, 2.0) == pytest.approx(4.6498e-5, rel=1e-4)
    # a far tail, summed upwards from k: P(X >= 160 | 100) from the terms themselves
    far = sum(math.exp(i * math.log(100) - 100 - math.lgamma(i + 1)) for i in range(160, 400))
    assert poisson_sf(160, 100.0) == pytest.approx(far, rel=1e-9)
    assert poisson_sf(0, 3.0) == 1.0 and poisson_sf(3, 0.0) == 0.0


def test_binomial_tails_and_negative_binomial() -> None:
    # P(X >= 1 | 20, 0.01) = 1 - 0.99^20 = 0.182093
    assert binom_sf(1, 20, 0.01) == pytest.approx(1 - 0.99**20, rel=1e-12)
    # P(X >= 2 | 20, 0.01) = 1 - 0.99^20 - 20 x 0.01 x 0.99^19 = 0.0168593
    assert binom_sf(2, 20, 0.01) == pytest.approx(1 - 0.99**20 - 20 * 0.01 * 0.99**19, rel=1e-9)
    # P(X <= 13 | 20, 0.99) = P(failures >= 7 | 20, 0.01) = sum_{j>=7} C(20,j) 0.01^j 0.99^(20-j) ~ 6.9e-10
    tail = sum(math.comb(20, j) * 0.01**j * 0.99 ** (20 - j) for j in range(7, 21))
    assert binom_cdf(13, 20, 0.99) == pytest.approx(tail, rel=1e-6)
    assert 6e-10 < tail < 8e-10
    # negative binomial with r = 1 is geometric: P(X >= k) = (1 - p)^k, mean (1 - p) / p
    # mean 4, variance 20 -> r = 16 / 16 = 1, p = 1 / 5: P(X >= 3) = 0.8^3 = 0.512
    assert count_sf(3, 4.0, 20.0) == pytest.approx(0.8**3, rel=1e-9)
    assert count_sf(3, 4.0, 4.0) == pytest.approx(poisson_sf(3, 4.0))  # not overdispersed: Poisson
    # beta-binomial with Beta(1, 1) is uniform on 0..n: P(X >= 2 | n = 5) = 4 / 6
    assert betabinom_sf(2, 5, 1.0, 1.0) == pytest.approx(4 / 6, rel=1e-12)
    # an error baseline of 1 in 360 calls (Jeffreys a = 1.5, b = 359.5), a window of 12 calls:
    # P(X >= 4) <= C(12, 4) E[p^4] = 495 x (1.5 x 2.5 x 3.5 x 4.5) / (361 x 362 x 363 x 364) = 1.7e-6
    # (a bound: it drops the (1 - p)^8 of the mass; the exact tail is 1.54e-6): below the
    # 6.9e-6 of a 60 s anomaly rule, so 4 errors stand out; 3 (5.6e-5) do not
    assert betabinom_sf(4, 12, 1.5, 359.5) == pytest.approx(1.538e-6, rel=1e-3)
    assert betabinom_sf(3, 12, 1.5, 359.5) == pytest.approx(5.603e-5, rel=1e-3)


def test_wilson_normal_median_mad() -> None:
    assert norm_quantile(0.99) == pytest.approx(2.326348, abs=1e-6)
    assert norm_quantile(0.5) == pytest.approx(0.0, abs=1e-9)
    # 1 failure in 20, one-sided 99% (z = 2.3263): success 0.95, centre (0.95 + z^2/40) / (1 + z^2/20)
    # = 1.08530 / 1.27059 = 0.85417; margin z sqrt(0.95 x 0.05 / 20 + z^2 / 1600) / 1.27059 = 0.13891
    lo, hi = wilson_bounds(19, 20, norm_quantile(0.99))
    assert hi == pytest.approx(0.99308, abs=1e-4) and lo == pytest.approx(0.71526, abs=1e-4)
    assert median([3, 1, 2]) == 2 and median([1, 2, 3, 10]) == 2.5
    # |x - 2| for [1, 2, 3, 100] = [1, 0, 1, 98]: median 1, x 1.4826
    assert mad_sigma([1, 2, 3, 100]) == pytest.approx(1.4826)


def test_one_failure_in_20_does_not_breach_99_percent_but_7_do() -> None:
    r = Runner(engine(SUCCESS_99))
    # 1 in 20: if the true success rate were 99%, 1 or more failures come 18.2% of the time
    # (1 - 0.99^20): no evidence at 99% confidence
    assert r.feed(calls(0, 20, 1, dims=GPT)) == []
    # 7 in 20: P(>= 7 failures | 20, 1%) ~ 6.9e-10 and even against 95% (the critical level)
    # P(>= 7 failures | 20, 5%) = sum_{j>=7} C(20,j) 0.05^j 0.95^(20-j)
    # = 3.11e-5 + 2.7e-6 + 1.9e-7 + ... ~ 3.4e-5 < 0.01: critical
    [a] = r.feed(calls(1, 20, 7, dims=GPT))
    assert (a.state, a.severity, a.value, a.threshold) == ("firing", "critical", 0.65, 0.95)
    assert a.evidence is not None and (a.evidence["n"], a.evidence["count"]) == (20, 13)
    p = sum(math.comb(20, j) * 0.05**j * 0.95 ** (20 - j) for j in range(7, 21))
    assert float(a.evidence["p_value"]) == pytest.approx(p, rel=1e-4) and 3e-5 < p < 5e-5
    assert (a.expected_low, a.expected_high) == (0.99, None)  # healthy: at or above the target
    assert "[13 of 20, p=3.4e-05, 99% bound 0.8405]" in a.summary
    # the same 1 in 20, judged on its point value (confidence: null), reads as a breach
    point = Runner(engine(SUCCESS_99.replace("min_requests: 20", "min_requests: 20\n    confidence: null")))
    assert [x.severity for x in point.feed(calls(0, 20, 1, dims=GPT))] == ["warning"]


def test_latency_mean_needs_the_bound_above_the_target() -> None:
    rule = """
rules:
  - {name: slow, metric: latency_avg_ms, warning: 2000, by: [model], min_requests: 10}
"""
    # sd from the quantiles: max((3000 - 1800) / 1.645, (4000 - 1800) / 2.326) = max(729.5, 945.8) = 945.8
    # n = 16: se = 236.4; 99% lower bound 2300 - 2.3263 x 236.4 = 1750 < 2000: not shown
    r = Runner(engine(rule))
    q = {"latency_p50_ms": 1800.0, "latency_p95_ms": 3000.0, "latency_p99_ms": 4000.0}
    assert r.feed(agg(0, dims=GPT, requests=16, latency_avg_ms=2300.0, **q)) == []
    # n = 400: se = 47.3; bound 2300 - 110 = 2190 > 2000: breach
    [a] = r.feed(agg(1, dims=GPT, requests=400, latency_avg_ms=2300.0, **q))
    assert a.severity == "warning" and a.evidence is not None
    assert float(a.evidence["bound"]) == pytest.approx(2300 - 2.326348 * 945.83 / 20, abs=0.5)


def test_daily_peak_is_not_an_anomaly_but_twice_the_peak_is() -> None:
    """A strong diurnal curve with Poisson noise (seeded), through the shipped rules.

    Requests per minute for model m: 20 at night to 200 at the 15:00 UTC peak (10x), 3 days.
    On day 4 the peak hour is the usual one (quiet), then twice it (fires within a window).
    By hand for the doubled peak minute: expected ~200 (median of the 3 previous days' 15:00
    bucket means), within-bucket variance ~ Poisson 200; 400 >= 1.5 x 200 and P(X >= 400 |
    Poisson 200) ~ 1e-35 < 0.001.
    """
    rng = random.Random(14)

    def rate(minute_of_day: int) -> float:
        x = (minute_of_day - 15 * 60) / 1440 * 2 * math.pi
        return 20 + 180 * ((1 + math.cos(x)) / 2) ** 3

    def poisson(lam: float) -> int:
        # inversion by sequential search (exact, fine for lambda <= 400)
        u, k, p = rng.random(), 0, math.exp(-lam)
        s = p
        while u > s:
            k += 1
            p *= lam / k
            s += p
        return k

    r = Runner(RulesEngine(load_rules(None)))
    day0 = T0.replace(hour=0)
    m_dims = {"model": "m"}
    for day in range(3):
        for m in range(0, 1440, 1):
            start = day0 + timedelta(days=day, minutes=m)
            r.feed(agg(0, start=start, dims=m_dims, requests=poisson(rate(m))))
    firing = [a for a in r.alerts if a.rule == "requests_anomaly" and a.state == "firing"]
    # the first day judges against a (wider) rolling hour; days 2-3 against the time of day
    assert [a for a in firing if a.window_start >= day0 + timedelta(days=1)] == []
    r.alerts.clear()
    day3 = day0 + timedelta(days=3)
    for m in range(14 * 60, 15 * 60):  # the usual ramp to the peak
        r.feed(agg(0, start=day3 + timedelta(minutes=m), dims=m_dims, requests=poisson(rate(m))))
    assert [a for a in r.alerts if a.rule == "requests_anomaly"] == []
    out = r.feed(agg(0, start=day3 + timedelta(minutes=15 * 60), dims=m_dims, requests=poisson(2 * rate(900))))
    [a] = [x for x in out if x.rule == "requests_anomaly"]
    assert (a.state, a.dimensions, a.evidence and a.evidence["history"]) == ("firing", m_dims, "seasonal")
    assert a.baseline is not None and 185 < a.baseline < 215
    # twice the peak (~400 against ~200) with the shipped baseline_cv 0.15: sd = sqrt(200 + 30^2)
    # = 33, 6 sd out: p ~ 1e-7, below the 6.9e-7 a 60 s window needs at the shipped confidence
    # 0.999 (without the day-to-day spread it was 1e-20)
    ev = a.evidence or {}
    assert float(ev["alpha"]) == pytest.approx(6.944e-7, rel=1e-3)
    assert float(ev["p_value"]) < float(ev["alpha"])
    assert a.expected_low is not None and a.expected_high is not None
    # the band is the baseline -/+ z(1 - alpha) sd (4.83 x 33): the value is far outside it
    assert a.expected_low < a.baseline < a.expected_high < a.value
    assert a.expected_high == pytest.approx(a.baseline + 4.826 * float(ev["sd"]), rel=1e-3)  # z(1 - 6.9e-7)


def test_sums_use_a_scaled_poisson_as_skewed_as_few_calls() -> None:
    from llmpulse.streams.rules.baseline import Expectation, Observation
    from llmpulse.streams.rules.evidence import anomaly_test
    from llmpulse.streams.rules.model import AnomalyRule

    rule = AnomalyRule(name="cost", metric="cost_usd")
    # baseline: mean $10 a window, variance 20 -> dispersion c = 20 / 10 = 2 ($ per unit);
    # this window: $40 over 100 calls ($0.4 a call < c). In units: 40 / 2 = 20 against 10 / 2 = 5:
    # P(X >= 20 | Poisson 5) = 1 - e^-5 sum_{i<20} 5^i / i! = 3.5e-7 (a normal tail would say
    # (40 - 10) / sqrt(20) = 6.7 sd: 1e-11, far too sure for a skewed sum)
    p, _, _, ev = anomaly_test(
        rule, Observation(40.0), Expectation(10.0, 20.0, 100, 0, "seasonal"),
        agg(0, requests=100, cost_usd=40.0),
    )  # fmt: skip
    exact = 1 - math.exp(-5) * sum(5**i / math.factorial(i) for i in range(20))
    assert p == pytest.approx(exact, rel=1e-6) and 3e-7 < p < 4e-7
    assert ev["test"] == "scaled_poisson" and ev["dispersion"] == 2.0
    # the series' dispersion over its history floors it: c = 10 -> 4 units against 1
    p1, *_ = anomaly_test(
        rule, Observation(40.0), Expectation(10.0, 20.0, 100, 0, "seasonal", dispersion=10.0),
        agg(0, requests=100, cost_usd=40.0),
    )  # fmt: skip
    assert p1 == pytest.approx(poisson_sf(4, 1.0)) and p1 > 0.01
    # a history without any spread: one call of this window sets the unit (4 calls of $10)
    p2, *_ = anomaly_test(
        rule, Observation(40.0), Expectation(10.0, 0.0, 100, 0, "seasonal"), agg(0, requests=4, cost_usd=40.0)
    )
    assert p2 == pytest.approx(poisson_sf(4, 1.0))


KEY_RATE = """
rules:
  - name: key_rate
    metric: requests
    direction: above
    warning: 15
    critical: 1000
    window: 60
    by: [api_key_hash]
    min_requests: 0
"""


def test_fire_on_evidence_resolve_on_recovery() -> None:
    """Hysteresis: 40 calls against a limit of 15 is evidence (P(X >= 40 | 15) ~ 1e-7) and
    fires; 20 calls is past the limit but no evidence of it (P(X >= 20 | 15) = 0.125), and
    no evidence of recovery either, so the alert holds; 10 calls (within the limit) twice
    resolves it (resolve_after 2). Before, the 20s counted as clear and the alert resolved
    while the key still sent more than its limit (and its rate-limit action was lifted)."""
    key = {"api_key_hash": "k1"}
    r = Runner(engine(KEY_RATE))
    assert poisson_sf(20, 15.0) == pytest.approx(0.1248, abs=1e-3)
    r.feed(calls(0, 40, dims=key))
    assert r.events() == [("key_rate", "firing", "warning")]
    r.feed(*(calls(i, 20, dims=key) for i in range(1, 6)))
    assert r.events() == [("key_rate", "firing", "warning")]
    r.feed(calls(6, 10, dims=key), calls(7, 10, dims=key))
    assert r.events() == [("key_rate", "firing", "warning"), ("key_rate", "resolved", "warning")]
    # an inconclusive window never fires on its own, nor does a run of them
    r.feed(*(calls(i, 20, dims=key) for i in range(8, 14)))
    assert len(r.alerts) == 2


def test_student_t_at_known_quantiles() -> None:
    from llmpulse.streams.rules.stats import t_quantile, t_sf

    # tables: t(0.99; 3) = 4.5407, t(0.99; 1) = 31.821, t(0.975; 10) = 2.2281; P(T5 >= 2) = 0.05097
    assert t_quantile(0.99, 3) == pytest.approx(4.5407, abs=1e-4)
    assert t_quantile(0.99, 1) == pytest.approx(31.821, abs=1e-3)
    assert t_quantile(0.975, 10) == pytest.approx(2.2281, abs=1e-4)
    assert t_sf(2.0, 5) == pytest.approx(0.05097, abs=1e-5)
    assert t_quantile(0.99, 10_000) == pytest.approx(2.3263, abs=1e-3)  # the normal's, at many df
