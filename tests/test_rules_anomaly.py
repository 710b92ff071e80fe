"""Anomaly rules: rolling 24-hour baselines kept incrementally, and the seasonal method.

Since issue 14 a window is anomalous when the effect is at least the factor AND a test
finds it unlikely under a robust baseline (median of bucket means), and the default
method is seasonal; these tests name `method: rolling` where they test the rolling one.
"""

from __future__ import annotations

import json
import math
from datetime import timedelta
from typing import Any

import pytest

from llmpulse.streams.rules.baseline import Observation, add, expected
from llmpulse.streams.rules.model import AnomalyRule
from tests.rules_helpers import T0, Runner, agg, calls, engine

ROLLING = """
rules:
  - name: requests_anomaly
    type: anomaly
    metric: requests
    factor: 1.5
    critical_factor: 3
    method: rolling
    baseline: 24h
    window: 60
    min_baseline_windows: 10
    min_value: 10
"""


def _steady(r: Runner, n: int, value: int = 100) -> None:
    for i in range(n):
        assert r.feed(calls(i, value)) == []


def test_fires_at_1_6x_the_baseline_and_not_at_1_4x() -> None:
    quiet = Runner(engine(ROLLING))
    _steady(quiet, 30)
    assert quiet.feed(calls(30, 140)) == []
    loud = Runner(engine(ROLLING))
    _steady(loud, 30)
    [a] = loud.feed(calls(30, 160))
    assert (a.rule, a.state, a.severity) == ("requests_anomaly", "firing", "warning")
    assert (a.value, a.baseline, a.threshold) == (160, 100, 150)
    assert a.summary == (
        "requests 160 is 1.60x its 24h baseline 100 (> 1.5x) (expected 56.54..143.46)"
        " [count 160, p=2.1e-08 (poisson), baseline: rolling] (warning) overall in 60 s window ending 12:31:00 UTC"
    )
    [c] = loud.feed(calls(31, 400))
    # the baseline is the median of the 5-minute bucket means: the anomalous window does not move it
    assert (c.severity, c.baseline, c.threshold) == ("critical", 100, 300)
    # the evidence: a Poisson test (no spread beyond Poisson in a flat history), p far below 0.001
    assert c.evidence is not None and c.evidence["test"] == "poisson"
    assert float(c.evidence["p_value"]) < 1e-12 and c.evidence["count"] == 400


def test_does_not_judge_with_too_few_baseline_windows() -> None:
    r = Runner(engine(ROLLING))
    _steady(r, 5)
    assert r.feed(calls(5, 1000)) == []  # 10x, but 5 < 10 baseline windows
    r2 = Runner(engine(ROLLING))
    _steady(r2, 10)
    assert len(r2.feed(calls(10, 1000))) == 1


def test_min_value_and_below_direction() -> None:
    r = Runner(engine(ROLLING))
    _steady(r, 20, value=2)
    assert r.feed(calls(20, 9)) == []  # 4.5x but below min_value 10
    drop = Runner(
        engine(
            """
rules:
  - {name: traffic_drop, type: anomaly, metric: requests, direction: below, factor: 2,
     method: rolling, min_baseline_windows: 10, min_value: 50}
"""
        )
    )
    _steady(drop, 20)
    assert drop.feed(calls(20, 60)) == []
    [a] = drop.feed(calls(21, 40))
    assert (a.threshold, a.severity) == (100 / 2, "warning")  # median bucket mean 100


def test_baseline_covers_the_span_only_and_is_kept_incrementally() -> None:
    rule = AnomalyRule(name="x", metric="requests", method="rolling", baseline=3600, window=60)
    assert rule.bucket_s == 60  # max(window, 3600 / 288) rounded to the window
    st: dict[str, Any] = {}
    # two hours: the first hour at 1000, the second at 100
    for i in range(120):
        add(rule, st, 1_700_000_000 + i * 60, Observation(1000.0 if i < 60 else 100.0))
    exp = expected(rule, st, 1_700_000_000 + 120 * 60)
    assert exp is not None and (exp.mean, exp.windows, exp.var) == (100.0, 60, 0.0)
    assert len(st["roll"]) <= 61
    json.dumps(st)  # plain data
    day = AnomalyRule(name="d", metric="requests", method="rolling")
    assert day.bucket_s == 300 and day.baseline_s == 86400
    st = {}
    for i in range(3 * 1440):  # three days of 60 s windows: a 24h ring of 5-minute buckets
        add(day, st, 1_700_000_000 + i * 60, Observation(float(i)))
    assert 288 <= len(st["roll"]) <= 289
    # seasonal: 96 buckets of 15 minutes x 7 days at most, plus a rolling hour of 5-minute buckets
    seasonal = AnomalyRule(name="s", metric="requests")
    assert (seasonal.method, seasonal.bucket_s, seasonal.baseline_s) == ("seasonal", 900, 7 * 86400)
    st = {}
    for i in range(9 * 1440):
        add(seasonal, st, 1_700_006_400 + i * 60, Observation(float(i % 1440)))
    # 7 previous days plus today per bucket
    assert len(st["slots"]) == 96 and max(len(v) for v in st["slots"].values()) == 8
    assert len(st["roll"]) <= 13


def test_zero_fill_counts_windows_without_data_as_zeros() -> None:
    # traffic every other minute: by default the baseline averages the busy minutes ...
    r = Runner(engine(ROLLING))
    for i in range(0, 42, 2):
        assert r.feed(calls(i, 100)) == []
    # ... with zero_fill the quiet minutes count as zeros: the mean per minute is 50
    # (bucket means 60 and 40, median 50); 1000 stands out against the alternating 0/100
    filled = Runner(engine(ROLLING.replace("min_value: 10", "min_value: 10\n    zero_fill: true")))
    for i in range(0, 10, 2):
        assert filled.feed(calls(i, 100)) == []  # fewer than 10 windows elapsed: not judged yet
    [a] = filled.feed(calls(10, 1000))
    assert (a.baseline, a.value) == (50.0, 1000)
    assert a.evidence is not None and a.evidence["test"] == "negative_binomial"


def _curve(minute_of_day: int) -> float:
    """A daily curve with mean 100 and a peak of 300 (3x the mean) around 04:48 UTC."""
    span = 0.4 * 1440
    bump = math.sin(math.pi * minute_of_day / span) ** 2 if minute_of_day < span else 0.0
    return 50.0 + 250.0 * bump


SEASONAL = """
rules:
  - name: seasonal
    type: anomaly
    metric: requests
    method: seasonal
    baseline: 7d
    bucket: 15m
    window: 60
    min_baseline_windows: 15
  - name: rolling
    type: anomaly
    metric: requests
    method: rolling
    window: 60
    min_baseline_windows: 60
"""


def test_seasonal_quiet_on_a_daily_peak_3x_the_mean_and_fires_above_it() -> None:
    curve = [_curve(m) for m in range(1440)]
    assert abs(sum(curve) / 1440 - 100) < 0.5 and max(curve) > 299
    r = Runner(engine(SEASONAL))
    day0 = T0.replace(hour=0)
    seasonal_events = []
    for day in range(3):
        for m in range(1440):
            start = day0 + timedelta(days=day, minutes=m)
            out = r.feed(agg(0, start=start, requests=round(curve[m])))
            seasonal_events += [a for a in out if a.rule == "seasonal"]
    assert seasonal_events == []
    # the rolling 24h average calls the daily peak an anomaly: the seasonal method exists for that
    assert any(a.rule == "rolling" and a.state == "firing" for a in r.alerts)
    # day 4: a spike to 2x the usual peak, at the time of the peak
    peak = max(range(1440), key=lambda m: curve[m])
    r.alerts.clear()
    day3 = day0 + timedelta(days=3)
    for m in range(peak - 30, peak + 10):
        value = curve[m] * (2 if m >= peak else 1)
        out = r.feed(agg(0, start=day3 + timedelta(minutes=m), requests=round(value)))
        if m < peak:
            assert [a for a in out if a.rule == "seasonal"] == []
    fired = [a for a in r.alerts if a.rule == "seasonal"]
    assert [(a.state, a.window_start) for a in fired] == [
        ("firing", day3 + timedelta(minutes=peak))
    ]
    assert 280 < (fired[0].baseline or 0) <= 300
    assert "seasonal baseline (same time of day)" in fired[0].summary


def test_seasonal_uses_a_wider_rolling_hour_on_the_first_day() -> None:
    r = Runner(engine(SEASONAL.split("  - name: rolling")[0]))
    start = T0.replace(hour=0)
    # a 10x step on the first day: judged against the last hour, with bounds twice as wide
    for m in range(0, 330):
        r.feed(agg(0, start=start + timedelta(minutes=m), requests=100 if m < 300 else 1000))
    [a] = r.alerts
    assert (a.state, a.window_start, a.baseline) == ("firing", start + timedelta(minutes=300), 100)
    assert a.evidence is not None and a.evidence["history"] == "rolling_fallback"
    assert "rolling 1h baseline (less than a day of history, wider bounds)" in a.summary
    # a steady first day with Poisson-sized wobble raises nothing
    quiet = Runner(engine(SEASONAL.split("  - name: rolling")[0]))
    for m in range(0, 600):
        quiet.feed(agg(0, start=start + timedelta(minutes=m), requests=100 + (m * 37) % 21 - 10))
    assert quiet.alerts == []


def test_anomaly_state_survives_a_restart() -> None:
    seq = [calls(i, 100) for i in range(30)] + [
        calls(30, 200),
        calls(31, 210),
        calls(32, 100),
        calls(33, 100),
    ]
    truth = Runner(engine(ROLLING))
    truth.feed(*seq)
    assert [(a.state, a.severity) for a in truth.alerts] == [
        ("firing", "warning"),
        ("resolved", "warning"),
    ]
    a = Runner(engine(ROLLING))
    a.feed(*seq[:31])
    b = Runner(engine(ROLLING))
    b.states = dict(a.states)
    b.feed(*seq[30:])  # the window judged before the crash is delivered again
    assert [x.model_dump() for x in a.alerts + b.alerts] == [x.model_dump() for x in truth.alerts]


def test_seasonal_adds_the_weekday_once_a_week_of_history_exists() -> None:
    """Weekdays 100 calls a minute, weekends 20. A Saturday at 60 is 3x a Saturday but 0.6x
    a weekday: with a week of history the expected value is the same-time median (100) x
    last Saturday's level over the week's median level (20 / 100): 20, and 60 fires
    (P(X >= 60 | Poisson 20) ~ 1e-12). Before that (the first Saturday) it is compared
    with weekdays and stays quiet."""
    r = Runner(engine(SEASONAL.split("  - name: rolling")[0]))
    monday = T0.replace(day=29, month=4, hour=0)  # 2024-04-29 was a Monday
    assert monday.weekday() == 0
    for day in range(12):
        level = 20 if day % 7 in (5, 6) else 100
        for m in range(0, 1440):
            value = 60 if day == 5 and 60 <= m < 75 else level  # the first Saturday: no week yet
            r.feed(agg(0, start=monday + timedelta(days=day, minutes=m), requests=value))
    assert [a for a in r.alerts if a.state == "firing"] == []
    saturday = monday + timedelta(days=12)
    for m in range(0, 60):
        assert r.feed(agg(0, start=saturday + timedelta(minutes=m), requests=20)) == []
    [a] = r.feed(agg(0, start=saturday + timedelta(minutes=60), requests=60))
    # last Saturday's level includes its own 15 minutes at 60: (20 x 1425 + 60 x 15) / 1440
    assert (a.state, a.baseline) == ("firing", pytest.approx(100 * (20 * 1425 + 60 * 15) / 1440 / 100))
    assert a.evidence is not None and a.evidence["history"] == "seasonal_weekly"
    assert "seasonal baseline (same time of day and weekday)" in a.summary


def test_an_anomaly_resolves_on_recovery_not_on_a_window_without_evidence() -> None:
    """A firing error-rate anomaly meets a window of 2 calls, 1 failed: 50% is 150x the
    baseline's 0.3% (the effect) but P(X >= 1 | 2 calls at 0.3%) ~ 0.006 is no evidence at
    p < 6.9e-6; nor is it recovery. It holds; two windows back at the baseline resolve it."""
    r = Runner(engine("""
rules:
  - {name: errs, type: anomaly, metric: error_rate, factor: 1.5, window: 60, by: [model],
     min_baseline_windows: 10, min_value: 0.02}
"""))  # fmt: skip
    gpt = {"model": "gpt-4o"}
    for i in range(60):  # 1 failed call every 20 minutes among 12 a minute
        assert r.feed(calls(i, 12, 1 if i % 20 == 5 else 0, dims=gpt)) == []
    [fired] = r.feed(calls(60, 12, 8, dims=gpt))
    assert fired.state == "firing"
    assert r.feed(calls(61, 2, 1, dims=gpt)) == []  # held: neither fires again nor clears
    assert r.feed(calls(62, 12, 0, dims=gpt)) == []  # clear 1 of resolve_after 2
    [resolved] = r.feed(calls(63, 12, 0, dims=gpt))
    assert resolved.state == "resolved"
    # its words name the baseline it was judged on (an hour of history: the rolling fallback)
    assert "back near its rolling 1h baseline (less than a day of history" in resolved.summary


def test_baseline_cv_keeps_an_ordinary_busier_day_quiet_but_not_a_real_spike() -> None:
    """Against a baseline taken as exact (one flat previous span), 160 calls where 100 were usual
    is p = 2e-8 (the test above). A usual day strays ~15% from yesterday's level: with
    baseline_cv 0.15 the spread is 100 + (0.15 x 100)^2 = 325 (sd 18), 160 is 3.3 sd and
    ordinary; 250 is 8.3 sd and fires."""
    rules = ROLLING.replace("min_value: 10", "min_value: 10\n    baseline_cv: 0.15")
    quiet = Runner(engine(rules))
    _steady(quiet, 30)
    assert quiet.feed(calls(30, 160)) == []
    loud = Runner(engine(rules))
    _steady(loud, 30)
    [a] = loud.feed(calls(30, 250))
    assert (a.state, a.severity, a.value) == ("firing", "warning", 250)
    assert a.evidence is not None and a.evidence["test"] == "negative_binomial"
    assert float(a.evidence["p_value"]) < float(a.evidence["alpha"])


PER_CALL = """
rules:
  - name: cost_per_call_anomaly
    type: anomaly
    metric: cost_per_request
    factor: 3
    critical_factor: 6
    method: rolling
    baseline: 24h
    window: 60
    baseline_cv: 0.15
    min_baseline_windows: 10
    min_value: 0.002
    min_requests: 3
"""


def test_a_call_grown_several_times_over_is_an_anomaly_whatever_the_traffic() -> None:
    """Cost per priced call: 10 calls a minute at $0.0018 / $0.0022 a call by turns (baseline
    $0.002, spread: within-bucket sd 0.0002 plus 15% of $0.002 = sd 0.00036). A minute of 4
    calls at $0.008 (4x) is 16 sd out: fires, whatever the number of calls; 2.5x does not
    (below the factor); a call left unpriced does not dilute the average."""
    def run(last_cost: float, n: int, unpriced: int = 0) -> list[Any]:
        r = Runner(engine(PER_CALL))
        for i in range(30):
            per_call = 0.0018 if i % 2 else 0.0022
            assert r.feed(calls(i, 10, cost_usd=10 * per_call)) == []
        return r.feed(calls(30, n + unpriced, cost_usd=n * last_cost, unpriced_requests=unpriced))

    [a] = run(0.008, 4, unpriced=3)
    assert (a.rule, a.state, a.severity) == ("cost_per_call_anomaly", "firing", "warning")
    assert a.value == pytest.approx(0.008) and a.baseline == pytest.approx(0.002)
    assert a.evidence is not None and a.evidence["test"] == "normal"
    assert float(a.evidence["sd"]) == pytest.approx(math.sqrt(0.0002**2 * 60 / 59 + 0.0003**2), rel=0.05)
    assert run(0.005, 10) == []  # 2.5x: below the factor
    [c] = run(0.013, 10)
    assert c.severity == "critical"  # 6.5x


def test_series_dispersion_pools_variances_over_means() -> None:
    """Two bucket-days of 11 windows: mean 10, variance 20 and mean 30, variance 30. Pooled,
    (20 x 10 + 30 x 10) / (10 x 10 + 30 x 10) = 1.25 (the median of the ratios 2 and 1 would
    be 1.5; with heavy-tailed sums the median falls below the truth)."""
    from llmpulse.streams.rules.baseline import series_dispersion

    def entry(day: int, w: int, mean: float, var: float) -> list[float]:
        return [day, w, mean * w, (var * (w - 1) / w + mean * mean) * w]

    st = {"slots": {"0": [entry(1, 11, 10.0, 20.0)], "1": [entry(1, 11, 30.0, 30.0)]}}
    assert series_dispersion(st) == pytest.approx(1.25)
    # the most dispersed tenth of bucket-days is left out (a burst the baseline kept)
    st["slots"].update({str(k): [entry(1, 11, 10.0, 10.0)] for k in range(2, 10)})
    st["slots"]["10"] = [entry(1, 11, 10.0, 10_000.0)]
    assert series_dispersion(st) == pytest.approx((200 + 300 + 8 * 100) / (100 + 300 + 8 * 100))


def test_per_call_metrics_are_derived_from_the_window_sums() -> None:
    a = calls(0, 10, total_tokens=12_000, cost_usd=0.06, unpriced_requests=4)
    assert a.tokens_per_request == 1200 and a.cost_per_request == pytest.approx(0.01)  # 6 priced calls
    empty = calls(1, 0)
    assert empty.tokens_per_request is None and empty.cost_per_request is None
    all_unpriced = calls(2, 3, cost_usd=0.0, unpriced_requests=3)
    assert all_unpriced.cost_per_request is None
