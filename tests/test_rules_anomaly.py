"""Anomaly rules: rolling 24-hour baselines kept incrementally, and the seasonal method."""

from __future__ import annotations

import json
import math
from datetime import timedelta
from typing import Any

from llmpulse.streams.rules.baseline import add_to_baseline, baseline_of
from llmpulse.streams.rules.model import AnomalyRule
from tests.rules_helpers import T0, Runner, agg, calls, engine

ROLLING = """
rules:
  - name: requests_anomaly
    type: anomaly
    metric: requests
    factor: 1.5
    critical_factor: 3
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
        "requests 160 is 1.60x its 24h baseline 100 (> 1.5x) (warning) overall in 60 s window ending 12:31:00 UTC"
    )
    [c] = loud.feed(calls(31, 400))
    # the baseline is every window before this one, the anomalous one included
    assert (c.severity, c.baseline, c.threshold) == ("critical", 3160 / 31, 3 * 3160 / 31)


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
     min_baseline_windows: 10, min_value: 50}
"""
        )
    )
    _steady(drop, 20)
    assert drop.feed(calls(20, 60)) == []
    [a] = drop.feed(calls(21, 40))
    assert (a.threshold, a.severity) == (2060 / 21 / 2, "warning")


def test_baseline_covers_the_span_only_and_is_kept_incrementally() -> None:
    rule = AnomalyRule(name="x", metric="requests", baseline=3600, window=60, zero_fill=False)
    assert rule.bucket_s == 60  # max(window, 3600 / 288) rounded to the window
    st: dict[str, Any] = {}
    # two hours: the first hour at 1000, the second at 100
    for i in range(120):
        add_to_baseline(rule, st, 1_700_000_000 + i * 60, 1000.0 if i < 60 else 100.0)
    mean, n = baseline_of(rule, st, 1_700_000_000 + 120 * 60) or (0, 0)
    assert (mean, n) == (100.0, 60)
    assert len(st["buckets"]) <= 61
    json.dumps(st)  # plain data
    day = AnomalyRule(name="d", metric="requests")
    assert day.bucket_s == 300 and day.baseline == 86400
    st = {}
    for i in range(3 * 1440):  # three days of 60 s windows: a 24h ring of 5-minute buckets
        add_to_baseline(day, st, 1_700_000_000 + i * 60, float(i))
    assert 288 <= len(st["buckets"]) <= 289


def test_zero_fill_counts_windows_without_data_as_zeros() -> None:
    # traffic every other minute: by default the baseline averages the busy minutes ...
    r = Runner(engine(ROLLING))
    for i in range(0, 42, 2):
        assert r.feed(calls(i, 100)) == []
    # ... with zero_fill the quiet minutes count as zeros: the mean per minute is 50
    filled = Runner(engine(ROLLING.replace("min_value: 10", "min_value: 10\n    zero_fill: true")))
    for i in range(0, 10, 2):
        assert filled.feed(calls(i, 100)) == []  # fewer than 10 windows elapsed: not judged yet
    [a] = filled.feed(calls(10, 100))
    assert (a.baseline, a.value) == (50.0, 100)


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


def test_seasonal_does_not_judge_on_the_first_day() -> None:
    r = Runner(engine(SEASONAL.split("  - name: rolling")[0]))
    for m in range(0, 600):
        r.feed(
            agg(
                0, start=T0.replace(hour=0) + timedelta(minutes=m), requests=10 if m < 300 else 1000
            )
        )
    assert r.alerts == []


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
