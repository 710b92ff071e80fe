"""Anomaly baselines kept incrementally (baseline.Summaries) judge exactly as a fresh rescan.

The rule state is plain data stored after every window; what a Summaries keeps is derived
from it and never stored. So a baseline summarised window after window, a state restored
mid-stream (a new engine, or the same engine handed a new object) and a state read back
from JSON at every window must give the same expectations, the same alerts and the same
stored states.
"""

from __future__ import annotations

import json
import math
import random
from datetime import timedelta
from typing import Any

import pytest

from llmpulse.schemas import Alert, WindowAggregate
from llmpulse.streams.rules.baseline import (
    Observation,
    Summaries,
    _parts_of,
    expected,
    series_dispersion,
)
from llmpulse.streams.rules.model import AnomalyRule
from tests.rules_helpers import T0, Runner, calls, engine

DAY0 = T0.replace(hour=0)
GPT = {"model": "gpt-4o"}
RULES = """
rules:
  - {name: calls_seasonal, type: anomaly, metric: requests, by: [model], zero_fill: true,
     baseline_cv: 0.15, min_baseline_windows: 10, min_value: 5, critical_factor: 3}
  - {name: calls_rolling, type: anomaly, metric: requests, by: [model], method: rolling,
     baseline: 2h, bucket: 5m, zero_fill: true, min_baseline_windows: 10, min_value: 5}
  - {name: errors_seasonal, type: anomaly, metric: error_rate, by: [model], min_requests: 10,
     min_value: 0.02, min_baseline_windows: 10}
  - {name: errors_rolling, type: anomaly, metric: error_rate, by: [model], method: rolling,
     baseline: 3h, min_requests: 10, min_baseline_windows: 10}
  - {name: cost_seasonal, type: anomaly, metric: cost_usd, by: [model], baseline_cv: 0.15,
     min_baseline_windows: 10, min_value: 0.001}
"""


def _traffic() -> list[WindowAggregate]:
    """A model's minutes from 08:00 to 15:40 the next day: a daily curve, a sparse night (a
    call every third minute), an error burst the first morning and a traffic and cost spike
    the next afternoon."""
    rng = random.Random(7)
    out = []
    for m in range(480, 1440 + 940):
        day, minute = divmod(m, 1440)
        if minute < 240 and minute % 3:
            continue
        level = 20 + 15 * math.sin(2 * math.pi * (minute - 360) / 1440)
        n = max(1, round(level * (0.8 + 0.4 * rng.random())))
        if day == 1 and 900 <= minute < 915:
            n *= 4
        p_err = 0.4 if day == 0 and 600 <= minute < 620 else 0.01
        errors = sum(rng.random() < p_err for _ in range(n))
        cost = round(n * 0.002 * (0.5 + rng.random()), 6)
        out.append(calls(0, n, errors, dims=GPT, start=DAY0 + timedelta(minutes=m), cost_usd=cost))
    return out


def _dump(alerts: list[Alert]) -> list[dict[str, Any]]:
    return [a.model_dump() for a in alerts]


def test_a_state_restored_mid_stream_judges_as_the_uninterrupted_engine() -> None:
    seq = _traffic()
    cuts = (300, 1000, len(seq) - 100)
    # uninterrupted: one engine, the state kept in memory (its Summaries kept between windows)
    truth = engine(RULES)
    state: dict[str, Any] = {"v": 2, "sig": "", "seen": {}, "rules": {}}
    alerts: list[Alert] = []
    stored: dict[int, str] = {}  # the state as the worker stores it, after window i - 1
    for i, a in enumerate(seq):
        if i in cuts:
            stored[i] = json.dumps(state)
        alerts += truth.evaluate(a, state)
    fired = {a.rule for a in alerts if a.state == "firing"}
    assert {"calls_seasonal", "errors_rolling", "cost_seasonal"} <= fired, fired
    assert any(a.evidence and a.evidence.get("history") == "seasonal" for a in alerts)
    final = json.dumps(state)

    # read back from JSON at every window (a new object each time: nothing kept)
    each = Runner(engine(RULES))
    each.feed(*seq)
    assert _dump(each.alerts) == _dump(alerts)
    assert json.loads(each.states["model=gpt-4o"]) == json.loads(final)

    # a restarted worker: a new engine from the stored state; the same engine handed the
    # restored state (a partition assigned back): another object than the one it summarised
    restarts = {cuts[0]: [engine(RULES)], cuts[1]: [truth], cuts[2]: [engine(RULES), truth]}
    for cut, engines in restarts.items():
        before = [a for a in alerts if a.window_start < seq[cut].window_start]
        for eng in engines:
            restored = json.loads(stored[cut])
            after: list[Alert] = []
            for a in seq[cut:]:
                after += eng.evaluate(a, restored)
            assert _dump(before + after) == _dump(alerts), cut
            assert restored == json.loads(final), cut


def _rules() -> list[AnomalyRule]:
    return [
        AnomalyRule(name="seasonal_filled", metric="requests", zero_fill=True, window=60),
        AnomalyRule(name="seasonal_rate", metric="error_rate", window=60),
        AnomalyRule(name="seasonal_cost", metric="cost_usd", window=60),
        AnomalyRule(
            name="rolling_filled", metric="requests", method="rolling", baseline=7200, bucket=300, zero_fill=True
        ),
        AnomalyRule(name="rolling_rate", metric="error_rate", method="rolling", baseline=10800, window=60),
        AnomalyRule(name="rolling_day", metric="total_tokens", method="rolling", window=60),
    ]


@pytest.mark.parametrize("rule", _rules(), ids=lambda r: r.name)
def test_kept_summaries_equal_a_fresh_rescan_window_by_window(rule: AnomalyRule) -> None:
    """Over three days of windows with gaps, quiet hours and now and then a window arriving
    late into a bucket already summarised, the kept Summaries' expectation and dispersion
    equal a fresh computation from the state at every window, and its floor of the mean is
    under the mean."""
    rng = random.Random(rule.name)
    state: dict[str, Any] = {}
    kept = Summaries(rule, state)
    t = int(DAY0.timestamp())  # from midnight: a day's first windows meet the day before's
    compared = floors = 0
    for _ in range(1800):
        step = rng.choice((1, 1, 1, 1, 2, 3)) if rng.random() > 0.02 else rng.randint(20, 90)
        t += 60 * step
        floor = kept.mean_floor(t)  # asked first: it changes nothing expected() then keeps
        exp = expected(rule, state, t)
        assert kept.expected(t) == exp
        if floor is not None:  # a floor under the mean the engine may judge against instead
            assert exp is not None and floor <= exp.mean, (floor, exp)
            floors += 1
        assert kept.dispersion() == series_dispersion(state)
        compared += 1
        n = rng.randint(5, 60)
        if rule.metric == "error_rate":
            k = rng.randint(0, 2)
            obs = Observation(k / n, k, n)
        elif rule.metric == "cost_usd":
            obs = Observation(round(n * 0.002 * (0.5 + rng.random()), 6))
        else:
            obs = Observation(float(n * (100 if rule.metric == "total_tokens" else 1)))
        # now and then a window late into an older bucket (the engine never adds one: it
        # ignores a window at or before the last judged; the Summaries stay exact regardless)
        kept.add(t - 600 if rng.random() < 0.03 else t, obs)
    assert compared == 1800 and state["roll"]
    if rule.metric == "error_rate":  # a rate's floor is its seasonal expectation, once there is one
        assert floors > 900 if rule.method == "seasonal" else floors == 0
    else:
        assert floors > 1700
    if rule.method == "seasonal":
        assert any(len(v) > 1 for v in state["slots"].values())  # judged on previous days too


def test_kept_dispersion_equals_a_fresh_one_with_ties() -> None:
    """The dispersion kept in order (a window's time-of-day bucket taken out and put back,
    not all bucket-days sorted again) equals series_dispersion of the state at every window:
    with bucket-days of equal ratios at the cut of the top tenth (their place is their slot
    and day order), new buckets appearing while others are kept, a bucket's parts taken
    out and put back window after window, and days ageing out of the baseline."""
    rule = AnomalyRule(name="cost", metric="cost_usd", window=60, baseline=2 * 86400)
    state: dict[str, Any] = {}
    kept = Summaries(rule, state)
    rng = random.Random(7)
    t = int(DAY0.timestamp())
    for i in range(4 * 720):
        t += 120 * rng.choice((1, 1, 1, 2, 5))
        if (t // 3600) % 3 == 0:  # swinging the same way every third hour: the same ratios
            t -= t % 120
            value = 1.0 if (t // 120) % 2 else 0.01
        else:
            value = round(rng.uniform(0.2, 0.6), 4)
        kept.add(t, Observation(value))
        if i % 2 == 0:
            assert kept.dispersion() == series_dispersion(state), t
    ratios = [p[0] for entries in state["slots"].values() for p in _parts_of(entries)]
    top = sorted(ratios)[len(ratios) - len(ratios) // 10 - 1]  # the highest ratio kept
    assert ratios.count(top) > 1, ratios  # the cut falls among ties
