"""Rules judged in bulk (RulesEngine.judge, what the worker's finalizer calls per publish)
give what ``evaluate`` gives one aggregate at a time; an anomaly's expectation left
underived (evidence.cannot_breach, Summaries.mean_floor) changes no verdict.

The engine judges a run of aggregates of one window one rule at a time, and skips the
baseline's expectation of a window that cannot breach; both must leave the alerts, their
order and the stored states exactly as the one-at-a-time, always-derived judging made them.
"""

from __future__ import annotations

import json
import math
import random
from datetime import timedelta
from typing import Any

import pytest

import llmpulse.streams.rules.engine as engine_module
from llmpulse.schemas import Alert, WindowAggregate
from llmpulse.streams.rules import new_state
from llmpulse.streams.rules.baseline import Expectation, Observation
from llmpulse.streams.rules.evidence import cannot_breach, judge_anomaly
from llmpulse.streams.rules.model import AnomalyRule
from tests.rules_helpers import T0, agg, engine

RULES = """
rules:
  - {name: errs, metric: error_rate, warning: 0.05, critical: 0.2, by: [model], min_requests: 5,
     resolve_after: 2}
  - {name: app_calls, metric: requests, warning: 60, by: [app], resolve_after: 2}
  - {name: slow, metric: latency_avg_ms, warning: 2000, by: [model], publish: false, resolve_after: 1}
  - {name: gpt_only, metric: requests, warning: 40, by: [model], match: {model: gpt-4o}}
  - {name: both, type: composite, all_of: [errs, slow], resolve_after: 1}
  - {name: either, type: composite, any_of: [errs, slow], resolve_after: 1}
  - {name: calls_anomaly, type: anomaly, metric: requests, by: [[model], [app]], method: rolling,
     baseline: 2h, bucket: 5m, zero_fill: true, min_baseline_windows: 10, min_value: 5}
  - {name: cost_anomaly, type: anomaly, metric: cost_usd, by: [model], baseline_cv: 0.15,
     min_baseline_windows: 10, min_value: 0.001}
  - {name: error_anomaly, type: anomaly, metric: error_rate, by: [model], min_requests: 10,
     min_value: 0.02, min_baseline_windows: 10}
  - {name: quiet_app, type: anomaly, metric: requests, direction: below, by: [app], method: rolling,
     baseline: 1h, bucket: 5m, min_baseline_windows: 10, confidence: 0.9}
  - {name: tokens_today, type: budget, metric: total_tokens, warning: 300000, critical: 400000, window: 60}
"""
MODELS = ("gpt-4o", "claude", "llama")
APPS = ("chat", "search")


def _windows() -> list[WindowAggregate]:
    """Five hours of minutes, each window's aggregates together as the finalizer publishes
    them: per model, per app, all traffic, and 10 s windows no rule judges. An error burst
    on gpt-4o, slow calls on claude with errors for a while, a traffic spike on the search
    app, a drop on the chat app, a quiet llama."""
    rng = random.Random(3)
    out: list[WindowAggregate] = []
    for m in range(300):
        minute: list[WindowAggregate] = []
        per_app = dict.fromkeys(APPS, 0)
        total = 0
        for model in MODELS:
            n = max(0, round(rng.gauss(12 if model != "llama" else 2, 3)))
            if model == "gpt-4o" and 120 <= m < 135:
                n *= 4
            p_err = 0.5 if (model, m // 15) in (("gpt-4o", 4), ("claude", 10)) else 0.01
            errors = sum(rng.random() < p_err for _ in range(n))
            latency = 3000.0 if model == "claude" and 150 <= m < 170 else 400.0 + 50 * rng.random()
            if n:
                minute.append(_calls(m, n, errors, {"model": model}, latency, rng))
            for app in APPS:
                per_app[app] += n // 2 if app == "chat" else n - n // 2
            total += n
        for app in APPS:
            n = per_app[app] * (5 if app == "search" and 200 <= m < 210 else 1)
            if app == "chat" and 240 <= m < 260:
                n = 1
            minute.append(_calls(m, n, 0, {"app": app}, 420.0, rng))
        minute.append(_calls(m, total, 0, {}, 420.0, rng))
        for k in range(6):
            minute.append(agg(m * 6 + k, window=10, requests=total // 6))
        rng.shuffle(minute)  # the order is the publisher's: the verdicts must not depend on it
        out += minute
    return out


def _calls(m: int, n: int, errors: int, dims: dict[str, str], latency: float, rng: random.Random) -> WindowAggregate:
    rate = errors / n if n else 0.0
    return agg(
        m, dims=dims, requests=n, errors=errors, error_rate=rate, success_rate=1 - rate,
        latency_avg_ms=latency, latency_p50_ms=latency, latency_p95_ms=latency * 1.5,
        latency_p99_ms=latency * 2, cost_usd=round(n * 0.002 * (0.5 + rng.random()), 6),
        total_tokens=n * 900,
    )  # fmt: skip


def _series(a: WindowAggregate) -> tuple[str, int, str]:
    return (a.kind, a.window_s, a.dims_key)


def _read(
    kept: dict[tuple[str, int, str], str], a: WindowAggregate, asked: list[tuple[str, int, str]]
) -> dict[str, Any] | None:
    asked.append(_series(a))
    raw = kept.get(_series(a))
    return json.loads(raw) if raw is not None else None


def _dump(alerts: list[Alert]) -> list[dict[str, Any]]:
    return [a.model_dump() for a in alerts]


def test_judging_in_bulk_equals_one_aggregate_at_a_time() -> None:
    seq = _windows()
    # a window delivered again (a crash before the state was stored): judged before, ignored
    seq[4000:4000] = [a for a in seq[3000:3030] if a.window_s == 60]
    # one aggregate at a time, each dimension set's state read back from JSON every window
    one = engine(RULES)
    stored: dict[tuple[str, int, str], str] = {}
    alerts_one: list[list[Alert]] = []
    for a in seq:
        if not one.applies(a):
            continue
        raw = stored.get(_series(a))
        state = json.loads(raw) if raw is not None else new_state()
        alerts_one.append(one.evaluate(a, state))
        stored[_series(a)] = json.dumps(state, sort_keys=True)
    # in bulk: calls of 1 to 80 aggregates, across windows, states stored after each call
    bulk = engine(RULES)
    kept: dict[tuple[str, int, str], str] = {}
    alerts_bulk: list[list[Alert]] = []
    rng = random.Random(5)
    i = 0
    while i < len(seq):
        n = rng.choice((1, 2, 7, 15, 80))
        batch = seq[i : i + n]
        i += n
        asked: list[tuple[str, int, str]] = []
        judged = bulk.judge(batch, lambda a, asked=asked: _read(kept, a, asked))
        assert [j.aggregate for j in judged] == [a for a in batch if bulk.applies(a)]
        assert len(asked) == len(set(asked))  # each dimension set's state read once per call
        for j in judged:
            assert j.state is next(k.state for k in judged if _series(k.aggregate) == _series(j.aggregate))
            kept[_series(j.aggregate)] = json.dumps(j.state, sort_keys=True)
            alerts_bulk.append(j.alerts)
    assert [_dump(a) for a in alerts_bulk] == [_dump(a) for a in alerts_one]
    assert kept == stored
    # and the traffic made every kind of verdict: the comparison is not between two silences
    fired = {(a.rule, a.state) for alerts in alerts_one for a in alerts}
    assert {("errs", "firing"), ("errs", "resolved"), ("both", "firing"), ("either", "firing"),
            ("calls_anomaly", "firing"), ("tokens_today", "firing"), ("gpt_only", "firing"),
            ("quiet_app", "firing"), ("app_calls", "firing")} <= fired, fired  # fmt: skip


def test_bulk_judging_of_a_window_twice_in_one_call_judges_it_once() -> None:
    eng = engine(RULES)
    a = _calls(0, 100, 60, {"model": "gpt-4o"}, 400.0, random.Random(1))
    again = a.model_copy(update={"latency_avg_ms": 9000.0})
    judged = eng.judge([a, again], lambda _: None)
    assert [j.aggregate for j in judged] == [a, again]
    assert judged[0].state is judged[1].state
    assert [x.rule for x in judged[0].alerts] == ["errs", "gpt_only", "either"] and judged[1].alerts == []


def test_cannot_breach_means_no_anomaly_whatever_the_expectation() -> None:
    """Wherever cannot_breach says so (with a floor under the mean, when given), judge_anomaly
    gives no anomaly for any expectation: the engine may then leave it underived."""
    rng = random.Random(11)
    said = 0
    for i in range(4000):
        metric = rng.choice(("requests", "cost_usd", "error_rate", "latency_avg_ms"))
        rule = AnomalyRule(
            name="r", metric=metric, direction=rng.choice(("above", "below")),
            factor=rng.choice((1.5, 3.0)), critical_factor=None if i % 2 else 6.0,
            min_value=rng.choice((0.0, 0.5, 30.0)), min_requests=rng.choice((0, 3, 10)),
            min_baseline_windows=rng.choice((1, 10)),
        )  # fmt: skip
        n = rng.randint(0, 40)
        errors = rng.randint(0, n)
        value = {"requests": float(n), "cost_usd": n * 0.01 * rng.random(), "error_rate": errors / n if n else 0.0,
                 "latency_avg_ms": rng.uniform(0, 5000)}[metric]  # fmt: skip
        a = agg(i, dims={"model": "m"}, requests=n, errors=errors, error_rate=value if metric == "error_rate" else 0.0,
                cost_usd=value if metric == "cost_usd" else 0.0, latency_avg_ms=value)  # fmt: skip
        obs = Observation(value, errors, n) if metric == "error_rate" else Observation(value)
        pooled = rng.random() < 0.2
        mean = rng.choice((0.0, value / 4, value, value * 2, rng.uniform(0, 100)))
        floor = rng.choice((None, mean, mean * rng.random(), -1.0))
        if not cannot_breach(rule, obs, a, pooled=pooled, mean_floor=floor):
            continue
        said += 1
        for _ in range(5):
            exp = Expectation(mean, rng.uniform(0, 50), rng.randint(0, 30), rng.randint(0, 500),
                              rng.choice(("seasonal", "rolling", "rolling_fallback")), rng.uniform(0, 2))  # fmt: skip
            assert judge_anomaly(rule, obs, exp, a, lambda: 1.0, pooled=pooled).level is None
            if floor is None:  # then for any mean at all
                assert judge_anomaly(rule, obs, Expectation(rng.uniform(0, 1e-3), 0.0, 30, 0, "rolling"), a).level is None
    assert 500 < said < 3500  # both answers, often


def test_a_skipped_expectation_leaves_a_firing_anomaly_to_resolve_in_words() -> None:
    """With an alert open the expectation is derived: its resolution names the baseline."""
    eng = engine(RULES)
    state = new_state()
    out: list[Alert] = []
    for m in range(80):
        n = 40 if 60 <= m < 63 else 10
        out += eng.evaluate(agg(m, dims={"app": "chat"}, requests=n, errors=0, error_rate=0.0,
                                start=T0 + timedelta(minutes=m)), state)  # fmt: skip
    fired = [a for a in out if a.rule == "calls_anomaly" and a.state == "firing"]
    resolved = [a for a in out if a.rule == "calls_anomaly" and a.state == "resolved"]
    assert fired and resolved
    assert "back near its 2h baseline" in resolved[0].summary
    assert resolved[0].baseline is not None and math.isfinite(resolved[0].baseline)


def test_kept_summaries_dropped_at_their_bound_mid_window_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine keeps each series' baseline Summaries beside its state, up to
    MAX_KEPT_SUMMARIES, then drops them all, in the middle of a window's run of aggregates
    (the loop over a window holds the rule's kept ones): the verdicts and states are those
    of an engine that never drops them."""

    def run() -> tuple[list[list[dict[str, Any]]], dict[tuple[str, int, str], str]]:
        eng = engine(RULES)
        states: dict[tuple[str, int, str], dict[str, Any]] = {}  # kept as objects: Summaries reused
        alerts: list[list[dict[str, Any]]] = []
        seq = _windows()
        for i in range(0, len(seq), 40):
            for j in eng.judge(seq[i : i + 40], lambda a: states.get(_series(a))):
                states[_series(j.aggregate)] = j.state
                alerts.append(_dump(j.alerts))
        return alerts, {k: json.dumps(v) for k, v in states.items()}

    kept = run()
    monkeypatch.setattr(engine_module, "MAX_KEPT_SUMMARIES", 3)  # fewer than a window's series
    dropped = run()
    assert dropped == kept
    assert any(kept[0])  # alerts were made to compare
