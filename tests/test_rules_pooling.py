"""Low-traffic series: a window short of min_requests is judged pooled with the windows before
it (pooling.py), on cases worked out by hand; pure engine, state JSON-round-tripped per window."""

from __future__ import annotations

import json

import pytest

from llmpulse.schemas import WindowAggregate
from llmpulse.streams.rules import new_state
from llmpulse.streams.rules.stats import binom_sf
from tests.rules_helpers import Runner, agg, calls, engine

GPT = {"model": "gpt-4o"}
LLAMA = {"model": "llama-3.1-8b-instruct"}
ERRORS = """
rules:
  - name: errors
    metric: error_rate
    warning: 0.05
    critical: 0.5
    by: [model]
    min_requests: 10
"""
LATENCY = """
rules:
  - name: latency_avg
    metric: latency_avg_ms
    warning: 2000
    critical: 5000
    by: [model]
    min_requests: 10
"""


def slow(i: int, n: int, avg: float, sd: float = 1000.0) -> WindowAggregate:
    """A window of n calls averaging `avg` ms whose quantiles give a spread of `sd`
    ((p95 - p50) / 1.645 = sd; no p99)."""
    return agg(i, dims=LLAMA, requests=n, latency_avg_ms=avg, latency_p50_ms=avg,
               latency_p95_ms=avg + 1.645 * sd)  # fmt: skip


def test_a_short_window_is_judged_with_the_windows_before_it() -> None:
    r = Runner(engine(ERRORS))
    # 12 calls, none failed: judged alone (12 >= 10), clear
    assert r.feed(calls(0, 12, 0, dims=GPT)) == []
    # 8 calls, 6 failed: alone it holds too few calls; pooled with the window before,
    # 6 of 20: P(X >= 6 | 20, 0.05) = 1 - sum_{k<=5} C(20,k) 0.05^k 0.95^(20-k)
    #   = 1 - (0.35849 + 0.37735 + 0.18868 + 0.05958 + 0.01333 + 0.00224) = 0.00033 < 0.01
    [a] = r.feed(calls(1, 8, 6, dims=GPT))
    assert (a.state, a.severity, a.value) == ("firing", "warning", pytest.approx(0.3))
    assert a.evidence is not None
    assert (a.evidence["n"], a.evidence["count"]) == (20, 6)
    assert (a.evidence["windows"], a.evidence["span_s"]) == (2, 120)
    assert float(a.evidence["p_value"]) == pytest.approx(binom_sf(6, 20, 0.05), rel=1e-4)
    assert float(a.evidence["p_value"]) == pytest.approx(0.00033, abs=1e-5)
    # the alert's window is this window; its words say the span judged
    assert a.window_start == calls(1, 8, 6).window_start
    assert "6 of 20, over the last 2m (2 windows pooled), p=0.00033" in a.summary
    assert a.why() == a.summary[a.summary.index("[") + 1 : a.summary.index("]")]


def test_the_pool_goes_back_only_until_the_sample_holds_min_requests() -> None:
    r = Runner(engine(ERRORS))
    # windows of 4 calls, all failing from window 2 on
    assert r.feed(calls(0, 4, 0, dims=GPT), calls(1, 4, 0, dims=GPT)) == []  # 4, then 8 calls: too few
    # window 2: 4 + 4 + 4 = 12 calls, 4 failed: 4 of 12 at 0.05: P(X >= 4) = 0.0022 < 0.01
    [a] = r.feed(calls(2, 4, 4, dims=GPT))
    assert a.evidence is not None
    assert (a.evidence["n"], a.evidence["count"], a.evidence["windows"]) == (12, 4, 3)
    # window 3 needs 3 windows again (4 + 4 + 4), not the 4 it could reach: 8 of 12
    r.feed(calls(3, 4, 4, dims=GPT))
    state = json.loads(r.states["model=gpt-4o"])
    assert [e[1] for e in state["rules"]["errors"]["pool"]["w"]] == [4, 4, 4, 4]


def test_the_span_is_bounded_and_a_gap_counts_as_empty_windows() -> None:
    r = Runner(engine(ERRORS.replace("min_requests: 10", "min_requests: 10\n    pool_windows: 3")))
    assert r.feed(calls(0, 6, 6, dims=GPT)) == []
    # window 3 comes after two windows without calls: window 0 is out of its 3-window span
    assert r.feed(calls(3, 6, 6, dims=GPT)) == []
    [a] = r.feed(calls(4, 6, 6, dims=GPT))  # windows 3 and 4: 12 calls, 12 failed
    assert (a.severity, a.evidence and a.evidence["span_s"]) == ("critical", 120)
    state = json.loads(r.states["model=gpt-4o"])
    assert [e[0] - state["rules"]["errors"]["pool"]["w"][-1][0] for e in state["rules"]["errors"]["pool"]["w"]] == [-1, 0]
    for i in range(5, 30):  # the ring never holds more than pool_windows windows
        r.feed(calls(i, 1, 0, dims=GPT))
        assert len(json.loads(r.states["model=gpt-4o"])["rules"]["errors"]["pool"]["w"]) <= 3


def test_pooled_latency_mean_and_spread_by_hand() -> None:
    r = Runner(engine(LATENCY))
    # window 0: 4 calls at 5000 ms (sd 1000): too few alone, nothing to pool with
    assert r.feed(slow(0, 4, 5000.0)) == []
    # window 1: 6 calls at 4000 ms (sd 1000). Pooled, n = 10:
    #   mean = (4 x 5000 + 6 x 4000) / 10 = 4400
    #   var = 0.4 (1000^2 + 600^2) + 0.6 (1000^2 + 400^2) = 544,000 + 696,000 = 1,240,000: sd 1113.6
    #   99% lower bound = 4400 - 2.3263 x 1113.6 / sqrt(10) = 4400 - 819.2 = 3580.8 > 2000: warning
    #   (and < 5000: not critical)
    [a] = r.feed(slow(1, 6, 4000.0))
    assert (a.severity, a.value) == ("warning", pytest.approx(4400.0))
    assert a.evidence is not None
    assert float(a.evidence["sd"]) == pytest.approx(1113.55, abs=0.01)
    assert float(a.evidence["bound"]) == pytest.approx(4400 - 2.326348 * 1113.553 / 10**0.5, abs=0.1)
    assert float(a.evidence["bound"]) == pytest.approx(3580.8, abs=0.1)
    assert "n=10, over the last 2m (2 windows pooled), 99% bound 3,581" in a.summary


def test_no_too_little_data_resolution_during_a_low_traffic_incident() -> None:
    """The bench's miss: a latency spike on a model of ~5-10 calls a minute. Judged alone, a
    minute of 10 fired and the next minutes of 4 and 7 resolved it "for too little data"."""
    minutes = [(10, 5284.0), (4, 5044.0), (7, 4389.0), (6, 3547.0), (7, 4264.0), (6, 4792.0),
               (3, 5019.0), (1, 2592.0), (1, 3151.0), (5, 3628.0), (4, 4488.0)]  # fmt: skip
    alone = Runner(engine(LATENCY.replace("min_requests: 10", "min_requests: 10\n    pool_windows: 1")))
    for i, (n, avg) in enumerate(minutes):
        alone.feed(slow(i, n, avg, sd=1500.0))
    assert [x[1] for x in alone.events()] == ["firing", "resolved"]
    assert "too little data to judge: fewer than 10 over 1m" in alone.alerts[-1].summary
    pooled = Runner(engine(LATENCY))
    for i, (n, avg) in enumerate(minutes):
        pooled.feed(slow(i, n, avg, sd=1500.0))
    assert [x[1] for x in pooled.events()] == ["firing"]  # fires at minute 0 and holds
    # the spike ends: minutes of usual latency resolve it (resolve_after 2) once the pool is clear
    out = [pooled.feed(slow(i, 5, 350.0, sd=100.0)) for i in range(11, 16)]
    assert [len(o) for o in out].count(1) == 1 and pooled.events()[-1][1] == "resolved"
    # traffic that all but stops (1 call a minute, 5 in the 5-minute span) is too little data
    again = Runner(engine(LATENCY))
    again.feed(slow(0, 12, 6000.0, sd=1000.0))
    outs = [again.feed(slow(i, 1, 6000.0, sd=1000.0)) for i in range(1, 11)]
    resolved = [i for i, o in enumerate(outs, 1) if o]
    assert again.events() == [("latency_avg", "firing", "critical"), ("latency_avg", "resolved", "critical")]
    # minutes 1-4 pool with minute 0 (12 + k calls); from minute 5 the span holds < 10 calls:
    # minutes 5 and 6 count clear, and minute 6 resolves
    assert resolved == [6]
    assert "fewer than 10 over 5m" in again.alerts[-1].summary


def test_a_window_with_enough_calls_is_judged_alone_and_counts_and_sums_never_pool() -> None:
    r = Runner(engine(ERRORS))
    r.feed(calls(0, 100, 90, dims=GPT))  # a bad window, then a clean one of 10: judged alone
    out = r.feed(calls(1, 10, 0, dims=GPT))
    assert out == [] and r.events() == [("errors", "firing", "critical")]
    keys = Runner(engine("""
rules:
  - {name: key_rate, metric: requests, warning: 100, by: [api_key_hash], min_requests: 50}
"""))  # fmt: skip
    k = {"api_key_hash": "k1"}
    assert keys.feed(agg(0, dims=k, requests=40), agg(1, dims=k, requests=45)) == []
    assert "pool" not in json.loads(keys.states["api_key_hash=k1"])["rules"]["key_rate"]


def test_a_state_stored_before_pooling_and_a_metric_change_start_a_fresh_pool() -> None:
    eng = engine(ERRORS)
    state = new_state()
    eng.evaluate(calls(0, 8, 8, dims=GPT), state)
    del state["rules"]["errors"]["pool"]  # as stored by a worker before pooling existed
    assert eng.evaluate(calls(1, 8, 8, dims=GPT), state) == []  # 8 alone: too few, nothing lost
    assert [a.severity for a in eng.evaluate(calls(2, 8, 8, dims=GPT), state)] == ["critical"]
    other = engine(ERRORS.replace("metric: error_rate", "metric: success_rate\n    direction: below")
                   .replace("warning: 0.05", "warning: 0.95"))  # fmt: skip
    other.evaluate(calls(3, 8, 8, dims=GPT), state)
    assert state["rules"]["errors"]["pool"]["k"] == "success_rate/60"
    assert len(state["rules"]["errors"]["pool"]["w"]) == 1


ERROR_ANOMALY = """
rules:
  - name: error_rate_anomaly
    type: anomaly
    metric: error_rate
    factor: 1.5
    critical_factor: 3
    window: 60
    by: [model]
    min_baseline_windows: 10
    min_value: 0.02
    min_requests: 10
"""


def test_a_rate_anomaly_on_a_low_traffic_series_is_judged_pooled() -> None:
    """A model of 6 calls a minute at night: its error burst is never judged window by window
    (6 < min_requests 10); pooled, two minutes hold 12 calls and are tested together."""
    runs = {}
    for pool in (5, 1):
        r = Runner(engine(ERROR_ANOMALY.replace("min_requests: 10", f"min_requests: 10\n    pool_windows: {pool}")))
        # an hour of 12 calls a minute, 1 failed call every 20 minutes: baseline share ~0.4%
        for i in range(60):
            assert r.feed(calls(i, 12, 1 if i % 20 == 5 else 0, dims=GPT)) == []
        # then 6 calls a minute, 4 of them failing
        runs[pool] = [r.feed(calls(60 + i, 6, 4, dims=GPT)) for i in range(4)]
    alone = runs[1]
    assert all(out == [] for out in alone)  # 6 < 10 calls: never judged
    pooled = runs[5]
    # minute 60: 6 calls, pooled with minute 59 (12 calls, 0 failed): 4 of 18 = 22%, 73x the
    # baseline's share (2 failed of 660 calls in the rolling hour, its worst 5-minute bucket
    # left out: 0.3%); P(X >= 4 | 18 calls at 0.3%) ~ C(18,4) 0.003^4 = 2.5e-7, and the
    # beta-binomial, with the uncertainty of a share seen on 660 calls, 3.1e-6 < 6.9e-6
    [a] = pooled[0]
    assert (a.rule, a.state) == ("error_rate_anomaly", "firing")
    assert a.value == pytest.approx(4 / 18)
    assert a.evidence is not None
    assert (a.evidence["n"], a.evidence["count"]) == (18, 4)
    assert (a.evidence["windows"], a.evidence["span_s"]) == (2, 120)
    assert float(a.evidence["baseline_calls"]) == 660 and a.baseline == pytest.approx(2 / 660)
    assert float(a.evidence["p_value"]) == pytest.approx(3.1e-6, rel=0.05)
    assert float(a.evidence["p_value"]) < float(a.evidence["alpha"])
    assert "4 of 18, over the last 2m (2 windows pooled)" in a.summary
    # the burst goes on at 6 calls a minute: pooled minutes keep it firing, no flapping
    assert all(out == [] for out in pooled[1:])


def test_a_short_window_whose_own_calls_breach_fires_on_them_with_a_small_sample_bound() -> None:
    """The first minute of a latency spike on a quiet model: pooled with the calm minutes before
    it the spike is diluted; its own 4 calls show it (Student's t, 3 degrees of freedom)."""
    r = Runner(engine(LATENCY))
    for i in range(5):
        assert r.feed(slow(i, 5, 600.0, sd=200.0)) == []
    # 4 calls averaging 7,680 ms, spread 1,600 ms: 99% lower bound with t(0.99, 3) = 4.5407:
    # 7680 - 4.5407 x 1600 / sqrt(4) = 7680 - 3632.6 = 4047.4 > 2000: warning (< 5000).
    # Pooled with the windows before (n = 14, mean 2,622) it would not breach.
    [a] = r.feed(slow(5, 4, 7680.0, sd=1600.0))
    assert (a.severity, a.value) == ("warning", pytest.approx(7680.0))
    assert a.evidence is not None and a.evidence["small_sample"] == "true"
    assert float(a.evidence["n"]) == 4
    assert float(a.evidence["bound"]) == pytest.approx(7680 - 4.540703 * 1600 / 2, abs=0.1)
    assert "windows" not in a.evidence
    # two calls are too few to fire alone, however slow
    r2 = Runner(engine(LATENCY))
    for i in range(5):
        assert r2.feed(slow(i, 5, 600.0, sd=200.0)) == []
    assert r2.feed(slow(5, 2, 9000.0, sd=500.0)) == []


def test_a_short_window_alone_never_clears_a_firing_alert() -> None:
    r = Runner(engine(LATENCY))
    for i in range(3):
        r.feed(slow(i, 12, 6000.0, sd=500.0))  # fires critical on full windows
    assert r.events()[0][:2] == ("latency_avg", "firing")
    # calm short windows: judged pooled with the slow ones (still breaching), never resolved alone
    assert r.feed(slow(3, 4, 500.0, sd=100.0)) == []
