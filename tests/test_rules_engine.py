"""Thresholds, `for`, min_requests, per-key rates, budgets, composites and the alert lifecycle."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from llmpulse.schemas import WindowAggregate, alert_fingerprint
from llmpulse.streams.rules import RulesEngine, has_open_alerts, load_rules, new_state
from tests.rules_helpers import T0, Runner, agg, calls, engine

ERROR_RATE = """
rules:
  - name: errors
    type: threshold
    metric: error_rate
    warning: 0.05
    critical: 0.10
    window: 60
    by: [model]
    min_requests: 20
    resolve_after: 2
    confidence: null  # point values: this file tests the lifecycle (test_rules_stats.py: the evidence)
"""
GPT = {"model": "gpt-4o"}


def incident() -> list[WindowAggregate]:
    """clear, warning, warning, critical, warning (de-escalation), critical, clear, clear, clear."""
    errors = [0, 7, 8, 12, 6, 15, 1, 0, 0]
    return [calls(i, 100, e, dims=GPT) for i, e in enumerate(errors)]


def test_warning_escalation_resolution_each_publish_exactly_once() -> None:
    r = Runner(engine(ERROR_RATE))
    r.feed(*incident())
    assert r.events() == [
        ("errors", "firing", "warning"),
        ("errors", "firing", "critical"),
        ("errors", "resolved", "critical"),
    ]
    fired, escalated, resolved = r.alerts
    fp = alert_fingerprint("errors", GPT)
    assert {a.fingerprint for a in r.alerts} == {fp}
    assert fired.window_start == T0 + timedelta(minutes=1)
    assert (
        fired.started_at == escalated.started_at == resolved.started_at == T0 + timedelta(minutes=1)
    )
    assert escalated.ts == escalated.window_end == T0 + timedelta(minutes=4)
    assert (escalated.value, escalated.threshold) == (0.12, 0.10)
    assert escalated.summary == (
        "error_rate 12.0% > 10% (critical) for model=gpt-4o in 60 s window ending 12:04:00 UTC"
    )
    assert fired.summary.startswith("error_rate 7.0% > 5% (warning) for model=gpt-4o")
    # resolve_after=2: the second clear window (index 7) resolves
    assert resolved.window_start == T0 + timedelta(minutes=7)
    assert resolved.summary.startswith("resolved: error_rate 0.0% <= 5% for model=gpt-4o")
    assert len({a.alert_id for a in r.alerts}) == 3


def test_restart_mid_incident_neither_repeats_nor_loses() -> None:
    seq = incident()
    truth = Runner(engine(ERROR_RATE))
    truth.feed(*seq)
    for cut in range(1, len(seq)):
        # worker 1 judges up to `cut`, its state is stored; worker 2 starts from the stored state,
        # is handed the last window again (re-delivery after the crash) and goes on.
        first = Runner(engine(ERROR_RATE))
        first.feed(*seq[:cut])
        second = Runner(engine(ERROR_RATE))
        second.states = dict(first.states)
        second.feed(seq[cut - 1], *seq[cut:])
        got = first.alerts + second.alerts
        assert [a.model_dump() for a in got] == [a.model_dump() for a in truth.alerts], cut


def test_de_escalation_and_flapping_do_not_spam() -> None:
    r = Runner(engine(ERROR_RATE))
    # critical, warning, critical, warning, one clear window (not enough to resolve), critical
    r.feed(*[calls(i, 100, e, dims=GPT) for i, e in enumerate([15, 7, 15, 7, 0, 15])])
    assert r.events() == [("errors", "firing", "critical")]


def test_for_needs_consecutive_windows_and_started_at_is_the_streak_start() -> None:
    r = Runner(
        engine(
            """
rules:
  - {name: slow, metric: latency_avg_ms, warning: 2000, window: 60, for: 3}
"""
        )
    )
    lat = [2500, 2600, 100, 2500, 2500, 2500, 2500]
    out = [r.feed(agg(i, requests=10, latency_avg_ms=v)) for i, v in enumerate(lat)]
    assert [len(o) for o in out] == [0, 0, 0, 0, 0, 1, 0]
    assert out[5][0].started_at == T0 + timedelta(minutes=3)
    assert out[5][0].summary.startswith("latency_avg_ms 2,500 ms > 2,000 ms (warning) overall")


def test_min_requests_below_which_the_rule_does_not_judge() -> None:
    # each window alone (pool_windows: 1); test_rules_pooling.py: short windows pooled
    r = Runner(engine(ERROR_RATE.replace("resolve_after: 2", "resolve_after: 2\n    pool_windows: 1")))
    assert r.feed(calls(0, 10, 9, dims=GPT)) == []  # 90% errors, but 10 < 20 requests
    assert r.feed(calls(1, 20, 9, dims=GPT))[0].severity == "critical"
    # too little traffic to judge counts as clear for resolution
    assert r.feed(calls(2, 5, 5, dims=GPT)) == []
    assert [a.state for a in r.feed(calls(3, 5, 5, dims=GPT))] == ["resolved"]
    assert "too little data to judge: fewer than 20 over 1m" in r.alerts[-1].summary


def test_below_direction_and_missing_value() -> None:
    r = Runner(
        engine(
            """
rules:
  - {name: rel, kind: feedback, metric: relevance_avg, direction: below, warning: 4.5, critical: 4.0,
     min_requests: 5, resolve_after: 1, confidence: null}
"""
        )
    )
    assert (
        r.feed(agg(0, kind="feedback", feedback_count=9, relevance_avg=4.5)) == []
    )  # equal meets it
    assert (
        r.feed(agg(1, kind="feedback", feedback_count=9, intent_accuracy=0.5)) == []
    )  # no relevance
    [a] = r.feed(agg(2, kind="feedback", feedback_count=9, relevance_avg=3.9))
    assert (a.severity, a.threshold) == ("critical", 4.0)
    assert a.summary.startswith("relevance_avg 3.90/5 < 4/5 (critical) overall")
    assert [
        x.state for x in r.feed(agg(3, kind="feedback", feedback_count=9, relevance_avg=4.8))
    ] == ["resolved"]


def test_rules_ignore_aggregates_they_do_not_judge() -> None:
    e = engine(ERROR_RATE)
    state = new_state()
    for a in [
        calls(0, 1000, 900),  # global: the rule is by model
        calls(0, 1000, 900, dims={"app": "x"}),
        calls(0, 1000, 900, dims=GPT, window=10),  # the 10 s window
        agg(0, kind="gpu", dims={"host": "h", "gpu": "0"}, samples=10, gpu_util_avg_pct=99.0),
    ]:
        assert not e.applies(a)
        assert e.evaluate(a, state) == []
    assert state == new_state()
    assert e.applies(calls(0, 1000, 900, dims=GPT))


def test_match_restricts_dimension_values() -> None:
    r = Runner(
        engine(
            """
rules:
  - {name: gpt_errors, metric: error_rate, warning: 0.05, by: [model], match: {model: gpt-4o}}
"""
        )
    )
    assert r.feed(calls(0, 100, 50, dims={"model": "llama"})) == []
    assert len(r.feed(calls(0, 100, 50, dims=GPT))) == 1


def test_per_key_rate_from_the_default_rules() -> None:
    r = Runner(RulesEngine(load_rules(None)))
    key_a, key_b = {"api_key_hash": "a" * 16}, {"api_key_hash": "b" * 16}
    assert r.feed(calls(0, 100, dims=key_a)) == []  # exactly 100 a minute is allowed
    [a] = r.feed(calls(1, 150, dims=key_a))
    assert (a.rule, a.severity, a.value, a.threshold) == ("key_rate", "warning", 150, 100)
    # a count a minute is a rate: 150 against 100 is P(X >= 150 | Poisson 100) = 1.9e-6 (issue 14)
    assert a.summary == (
        f"requests 150 > 100 [count 150, p=1.9e-06] (warning) for api_key_hash={'a' * 16}"
        " in 60 s window ending 12:02:00 UTC"
    )
    assert r.feed(calls(0, 106, dims=key_b)) == []  # 106 against 100: P = 0.29, no evidence
    assert r.feed(calls(1, 99, dims=key_b)) == []
    [c] = r.feed(calls(2, 1000, dims=key_a))
    assert (c.severity, c.threshold) == ("critical", 300)
    # the global window with far more calls is not a per-key rate
    assert [x.rule for x in r.feed(calls(0, 100_000))] == []


BUDGET = """
rules:
  - name: tokens_per_app
    type: budget
    metric: total_tokens
    by: [app]
    warning: 80000
    critical: 100000
    window: 60
    resolve_after: 1
"""


def test_daily_budget_warning_then_critical_then_reset_next_utc_day() -> None:
    r = Runner(engine(BUDGET))
    app = {"app": "chat"}
    day_end = T0.replace(hour=23, minute=50)
    out = [
        r.feed(
            agg(0, start=day_end + timedelta(minutes=i), dims=app, requests=10, total_tokens=30_000)
        )
        for i in range(4)
    ]
    # 30k, 60k, 90k (warning), 120k (critical)
    assert [[(a.state, a.severity) for a in o] for o in out] == [
        [],
        [],
        [("firing", "warning")],
        [("firing", "critical")],
    ]
    assert out[3][0].value == 120_000
    assert out[3][0].summary.startswith(
        "total_tokens 120,000 today > daily budget 100,000 (critical) for app=chat"
    )
    # another app has a budget of its own
    assert (
        r.feed(agg(0, start=day_end, dims={"app": "batch"}, requests=1, total_tokens=90_000))[
            0
        ].severity
        == "warning"
    )
    # the next UTC day starts from zero: the alert resolves, then fires only when exceeded again
    next_day = T0.replace(day=2, hour=0, minute=0)
    [res] = r.feed(agg(0, start=next_day, dims=app, requests=1, total_tokens=10_000))
    assert (res.state, res.value, res.rule_type) == ("resolved", 120_000, "budget")
    assert res.summary.startswith("resolved: total_tokens budget starts again at 00:00 UTC; 2024-05-01 ended at 120,000")
    assert (
        r.feed(
            agg(0, start=next_day + timedelta(minutes=1), dims=app, requests=1, total_tokens=60_000)
        )
        == []
    )
    [again] = r.feed(
        agg(0, start=next_day + timedelta(minutes=2), dims=app, requests=1, total_tokens=20_000)
    )
    assert (again.state, again.severity, again.value) == ("firing", "warning", 90_000)
    assert again.started_at == next_day + timedelta(minutes=2)


def test_shipped_daily_budget_alerts_once_escalates_once_and_ends_with_the_day() -> None:
    """daily_tokens of the shipped rules (resolve_after 2) on a day that passes 100k early:
    one alert at 80k, one escalation at 100k, nothing more all day however far over, and
    the alert resolves in the first window of the next UTC day."""
    r = Runner(RulesEngine(load_rules(None)))
    day = T0.replace(hour=0, minute=0)
    out = []
    for i in range(24 * 60):  # 2,000 tokens a minute: 2.88M by the end of the day
        out += r.feed(agg(0, start=day + timedelta(minutes=i), requests=10, total_tokens=2_000))
    budget = [a for a in out if a.rule == "daily_tokens"]
    assert [(a.state, a.severity, a.window_start - day) for a in budget] == [
        ("firing", "warning", timedelta(minutes=40)),  # 82k > 80k
        ("firing", "critical", timedelta(minutes=50)),  # 102k > 100k
    ]
    assert {a.rule_type for a in budget} == {"budget"}
    assert budget[0].evidence == {"day_total": 82_000, "day": day.strftime("%Y-%m-%d")}
    # a new day whose first window is already past the warning level: the old day's alert
    # resolves and the new day's fires, in the same window
    nxt = day + timedelta(days=1)
    got = [a for a in r.feed(agg(0, start=nxt, requests=10, total_tokens=90_000)) if a.rule == "daily_tokens"]
    assert [(a.state, a.severity, a.started_at) for a in got] == [
        ("resolved", "critical", day + timedelta(minutes=40)),
        ("firing", "warning", nxt),
    ]
    assert got[0].value == 2_880_000 and got[1].value == 90_000
    assert len({a.alert_id for a in got}) == 2


def test_budget_counts_one_window_size_only() -> None:
    r = Runner(engine(BUDGET))
    app = {"app": "chat"}
    # 10 s windows of the same traffic are not summed again
    for i in range(12):
        assert r.feed(agg(i, window=10, dims=app, total_tokens=50_000)) == []
    state = json.loads(r.states["app=chat"])
    assert state["rules"] == {}


COMPOSITE = """
rules:
  - {name: errs, metric: error_rate, warning: 0.05, critical: 0.2, by: [model], publish: false, resolve_after: 1}
  - {name: slow, metric: latency_avg_ms, warning: 2000, by: [model], publish: false, resolve_after: 1}
  - {name: both, type: composite, all_of: [errs, slow], resolve_after: 1}
  - {name: either, type: composite, any_of: [errs, slow], resolve_after: 1}
"""


def test_composite_all_of_and_any_of() -> None:
    r = Runner(engine(COMPOSITE))
    w = dict(dims=GPT)
    r.feed(calls(0, 100, 0, latency_avg_ms=100, **w))
    assert r.events() == []
    # errors critical only: 40 of 100 shows an error rate above 20% (P(X >= 40 | 100, 0.2) ~ 1e-5)
    r.feed(calls(1, 100, 40, latency_avg_ms=100, **w))
    assert r.events() == [("either", "firing", "critical")]
    r.feed(calls(2, 100, 40, latency_avg_ms=3000, **w))  # both
    assert r.events()[1:] == [("both", "firing", "warning")]  # lowest of members for all_of
    r.feed(calls(3, 100, 0, latency_avg_ms=3000, **w))  # errors clear
    assert r.events()[2:] == [("both", "resolved", "warning")]
    r.feed(calls(4, 100, 0, latency_avg_ms=100, **w))  # all clear
    assert r.events()[3:] == [("either", "resolved", "critical")]
    both = next(a for a in r.alerts if a.rule == "both")
    assert both.metric == "composite" and (both.value, both.threshold) == (2.0, 2.0)
    assert both.summary.startswith(
        "both: all of [errs (critical), slow (warning)] firing (warning) for model=gpt-4o"
    )
    assert not any(a.rule in ("errs", "slow") for a in r.alerts)  # publish: false


def test_removed_rule_resolves_its_open_alert_and_changed_levels_keep_state() -> None:
    r = Runner(engine(ERROR_RATE))
    r.feed(calls(0, 100, 50, dims=GPT))
    assert r.events() == [("errors", "firing", "critical")]
    # hot reload: the levels change; the open alert is kept (no new firing)
    r.engine = engine(ERROR_RATE.replace("critical: 0.10", "critical: 0.30"))
    assert r.feed(calls(1, 100, 50, dims=GPT)) == []
    # the rule is removed: its alert resolves instead of staying open forever
    r.engine = engine(
        ERROR_RATE.replace("name: errors", "name: errors2").replace(
            "min_requests: 20", "min_requests: 1000"
        )
    )
    [res] = r.feed(calls(2, 100, 50, dims=GPT))
    assert (res.rule, res.state, res.severity) == ("errors", "resolved", "critical")
    assert "was removed" in res.summary
    assert list(json.loads(r.states["model=gpt-4o"])["rules"]) == ["errors2"]


def test_default_rules_judge_the_operational_targets() -> None:
    r = Runner(RulesEngine(load_rules(None)))
    # success_rate is an SLO now: 40 errors in 200 calls burn a 1% budget 20x (> 14.4x in 1h and 5m)
    r.feed(calls(0, 200, 40, dims=GPT, latency_avg_ms=900.0))
    r.feed(agg(0, kind="gpu", dims={"host": "h1", "gpu": "0"}, samples=60, gpu_util_avg_pct=85.0))
    r.feed(agg(1, kind="gpu", dims={"host": "h1", "gpu": "0"}, samples=60, gpu_util_avg_pct=85.0))
    # 368 right of 400 (92%): P(X <= 368 | 400, 0.95) ~ 0.004 < 0.01, a warning; not below 90%
    r.feed(
        agg(0, kind="feedback", dims={"app": "chat"}, feedback_count=400, intent_accuracy=0.92, relevance_avg=4.6)
    )
    r.feed(agg(1, total_tokens=100_001, requests=50))
    # and 40 errors in 200 calls (20%) are an error burst at critical: P(X >= 40 | 200, 0.2) is
    # not below 0.01 (the point is at the level), but against 5% it is, a warning
    assert sorted(r.events()) == [
        ("daily_tokens", "firing", "critical"),
        ("error_burst", "firing", "warning"),
        ("gpu_utilisation", "firing", "warning"),
        ("intent_accuracy", "firing", "warning"),
        ("success_rate", "firing", "critical"),
    ]
    slo = next(a for a in r.alerts if a.rule == "success_rate")
    assert slo.dimensions == GPT and slo.metric == "burn_rate"
    assert slo.value == pytest.approx(20.0) and slo.threshold == 14.4
    assert slo.evidence is not None and slo.evidence["error_budget_remaining"] == pytest.approx(-19.0)


def test_sweep_resolves_alerts_of_a_dimension_set_that_went_quiet() -> None:
    e = engine(ERROR_RATE + BUDGET.replace("rules:\n", "").replace("by: [app]", "by: [model]"))
    state = new_state()
    assert [a.state for a in e.evaluate(calls(0, 100, 50, dims=GPT), state)] == ["firing"]
    assert has_open_alerts(state)
    # the model's traffic stops: nothing before resolve_after (2) empty windows have ended
    assert e.sweep(state, T0 + timedelta(minutes=2, seconds=59), GPT) == []
    [res] = e.sweep(state, T0 + timedelta(minutes=3))
    assert (res.rule, res.state, res.severity) == ("errors", "resolved", "critical")
    assert (res.window_start, res.window_end, res.ts) == (
        T0 + timedelta(minutes=2),
        T0 + timedelta(minutes=3),
        T0 + timedelta(minutes=3),
    )
    assert res.summary.startswith(
        "resolved: error_rate no data since 12:01:00 UTC for model=gpt-4o"
    )
    assert not has_open_alerts(state)
    assert e.sweep(state, T0 + timedelta(hours=1)) == []
    # a budget alert of a quiet dimension set resolves with the next UTC day, not before
    e.evaluate(agg(5, dims=GPT, requests=1, total_tokens=200_000), state)
    assert has_open_alerts(state)
    assert e.sweep(state, T0.replace(hour=23, minute=59)) == []
    [day] = e.sweep(state, T0.replace(day=2, hour=0, minute=1))
    assert (day.rule, day.state, day.window_start) == (
        "tokens_per_app",
        "resolved",
        T0.replace(day=2, hour=0),
    )


def test_a_version_1_state_migrates_keeping_open_alerts() -> None:
    """A state stored before issue 14 (v1: old-format anomaly baselines) keeps its open alert,
    which resolves normally; the baseline is rebuilt from the next windows."""
    e = engine(ERROR_RATE + "  - {name: traffic, type: anomaly, metric: requests, by: [model], method: rolling}\n")
    v1 = {
        "v": 1, "sig": "old", "seen": {"calls/60": int(T0.timestamp() * 1000)}, "dims": GPT,
        "rules": {
            "errors": {"k": "threshold", "streak": 1, "streak_start": int(T0.timestamp() * 1000),
                       "alert": {"severity": "critical", "started_at": int(T0.timestamp() * 1000), "clear": 0,
                                 "metric": "error_rate", "publish": True}},
            # the same data signature: only the version says the baseline's format is old
            "traffic": {"k": e.rules.by_name()["traffic"].data_signature(), "streak": 0, "baseline": {"buckets": [[1714564800, 100.0, 1]], "sum": 100.0,
                                                                "n": 1, "first": 1714564800}},
        },
    }  # fmt: skip
    state = json.loads(json.dumps(v1))
    assert e.evaluate(calls(1, 100, 0, dims=GPT), state) == []  # one clear window of resolve_after 2
    assert state["v"] == 2 and "buckets" not in state["rules"]["traffic"]["baseline"]
    [res] = e.evaluate(calls(2, 100, 0, dims=GPT), state)
    assert (res.rule, res.state, res.severity, res.started_at) == ("errors", "resolved", "critical", T0)
