"""The detection benchmark's labels and scoring (bench/detection*.py), on cases worked out by
hand: a wrong score would send the rules' tuning the wrong way without anyone noticing."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from detection import attribute, notifications, score
from detection_workload import KINDS, BudgetCrossing, BudgetLedger, Incident, Traffic, plan

from llmpulse.config.notify import NotifyConfig
from llmpulse.schemas.alert import Alert, alert_fingerprint
from llmpulse.schemas.fast import CallEventFast
from llmpulse.streams.rules import load_rules, parse_rules
from llmpulse.streams.rules.model import BudgetRule

T0 = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)
W = 60


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def alert(
    rule: str,
    dims: dict[str, str],
    window_min: float,
    *,
    state: str = "firing",
    started_min: float | None = None,
    severity: str = "warning",
    root_cause: dict[str, str | float] | None = None,
    rule_type: str | None = None,
) -> Alert:
    return Alert(
        fingerprint=alert_fingerprint(rule, dims), rule=rule, severity=severity, state=state,
        metric="m", dimensions=dims, window_start=at(window_min), window_end=at(window_min + 1),
        started_at=at(window_min if started_min is None else started_min), ts=at(window_min + 1),
        root_cause=root_cause, rule_type=rule_type,
    )  # fmt: skip


# an error burst on gpt-4o from 12:00:30 to 12:10:30: 30 s of it in the window ending 12:01,
# then its first 2 whole windows end 12:02 and 12:03
BURST = Incident(1, "error_burst", at(0.5), at(10.5), "model", "gpt-4o", 0.5, "gpt-4o")


def test_recall_needs_the_fault_named_within_two_windows() -> None:
    on_time = alert("success_rate", {"model": "gpt-4o"}, 1)  # window 12:01-12:02
    s = score([BURST], [on_time], W, at(60)).incidents[0]
    assert (s.recalled, s.recalled_start_plus_2w, s.detect_s, s.first_rule) == (True, True, 90.0, "success_rate")

    # the second whole window (ends 12:03): recalled, though later than start + 2 W (12:02:30)
    second = alert("success_rate", {"model": "gpt-4o"}, 2)
    s = score([BURST], [second], W, at(60)).incidents[0]
    assert (s.recalled, s.recalled_start_plus_2w, s.detect_s) == (True, False, 150.0)

    late = alert("success_rate", {"model": "gpt-4o"}, 3)  # ends 12:04: a third whole window
    s = score([BURST], [late], W, at(60)).incidents[0]
    assert (s.recalled, s.detect_s) == (False, 210.0)

    other_model = alert("success_rate", {"model": "gpt-4o-mini"}, 0)
    s = score([BURST], [other_model], W, at(60)).incidents[0]
    assert (s.recalled, s.detect_s, s.any_alert) == (False, None, True)

    global_with_cause = alert(
        "success_rate", {}, 0, root_cause={"dimension": "model", "value": "gpt-4o", "share": 0.9}
    )
    assert score([BURST], [global_with_cause], W, at(60)).incidents[0].recalled
    global_without = alert("success_rate", {}, 0)
    assert not score([BURST], [global_without], W, at(60)).incidents[0].recalled

    before = alert("success_rate", {"model": "gpt-4o"}, -2)  # window ends before the start
    assert score([BURST], [before], W, at(60)).incidents[0].detect_s is None


def test_false_alerts_are_episodes_outside_every_incident() -> None:
    alerts = [
        alert("cost_anomaly", {"app": "search"}, 30),  # outside: false
        alert(
            "cost_anomaly", {"app": "search"}, 31, started_min=30, severity="critical"
        ),  # same episode
        alert(
            "cost_anomaly", {"app": "search"}, 33, state="resolved", started_min=30
        ),  # not a firing
        alert(
            "latency_avg", {"model": "gpt-4o"}, 12
        ),  # starts in the 2-window tail: the incident's
        alert("latency_avg", {"model": "gpt-4o"}, 13),  # starts after the tail: false
        alert("daily_tokens", {}, 90),  # after the data's end: not judged
    ]
    s = score([BURST], alerts, W, at(60))
    assert dict(s.false_by_rule) == {"cost_anomaly": 1, "latency_avg": 1}


def test_one_alert_fired_and_resolved_is_two_notifications_for_its_incident() -> None:
    alerts = [
        alert("success_rate", {"model": "gpt-4o"}, 1),
        alert("success_rate", {"model": "gpt-4o"}, 13, state="resolved", started_min=1),
        alert("cost_anomaly", {"app": "search"}, 40),  # no incident: a message outside
    ]
    sent = notifications(alerts, NotifyConfig(), at(120))
    s = score([BURST], alerts, W, at(120))
    attribute(sent, s, W)
    assert s.incidents[0].notifications == 2
    # the burst: fired (after group_wait) and resolved; the cost alert: fired, never resolved
    assert (s.notifications, s.notifications_outside) == (3, 1)


def test_an_escalation_and_a_join_are_updates_of_the_incidents_page_not_notifications() -> None:
    alerts = [
        alert("error_rate_anomaly", {"model": "gpt-4o"}, 1),
        alert("error_rate_anomaly", {"model": "gpt-4o"}, 3, started_min=1, severity="critical"),
        alert("success_rate", {"app": "chat"}, 4),  # the same outage, another dimension: joins
        alert("error_rate_anomaly", {"model": "gpt-4o"}, 13, state="resolved", started_min=1, severity="critical"),
        alert("success_rate", {"app": "chat"}, 13, state="resolved", started_min=4),
    ]
    sent = notifications(alerts, NotifyConfig(), at(120))
    assert [n.update for n in sent] == [False, True, False]  # page, update (both changes), resolution
    s = score([BURST], alerts, W, at(120))
    attribute(sent, s, W)
    assert (s.incidents[0].notifications, s.incidents[0].updates) == (2, 1)
    assert (s.notifications, s.updates, s.notifications_outside) == (2, 1, 0)


def test_the_plan_moves_with_the_seed_and_covers_every_kind() -> None:
    start = datetime(2026, 11, 2, tzinfo=UTC)
    a, b = plan(1, start, 3 * 86400), plan(2, start, 3 * 86400)
    assert len(a.incidents) == 12 and {i.kind for i in a.incidents} == set(KINDS)
    assert [(i.kind, i.start, i.value) for i in a.incidents] != [
        (i.kind, i.start, i.value) for i in b.incidents
    ]
    assert a == plan(1, start, 3 * 86400)
    assert any(13.5 <= i.start.hour + i.start.minute / 60 < 16 for i in a.incidents)
    for x, y in zip(a.incidents, a.incidents[1:], strict=False):
        assert (y.start - x.end).total_seconds() >= 900


def test_incident_calls_carry_the_fault_and_ordinary_calls_do_not() -> None:
    w = plan(1, datetime(2026, 11, 2, 11, tzinfo=UTC), 6 * 3600, incidents=6)
    assert {i.kind for i in w.incidents} == set(KINDS)
    traffic = Traffic(w)
    events = list(traffic.events())
    calls = [e for kind, _, e in events if kind == "calls"]
    assert [e.ts for e in calls] == sorted(e.ts for e in calls)
    assert 0.001 < traffic.counts["background_errors"] / traffic.counts["calls"] < 0.006

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    for inc in w.incidents:

        def on(e: Any, inc: Incident = inc) -> bool:
            return getattr(e, inc.dimension, None) == inc.value

        during = [e for e in calls if inc.start <= e.ts < inc.end and on(e)]
        calm = [
            e
            for e in calls
            if inc.start - timedelta(minutes=40) <= e.ts < inc.start - timedelta(minutes=10)
            and on(e)
        ]
        if inc.kind == "error_burst":
            assert (
                mean([e.status_code >= 400 for e in during])
                > 0.2
                > 0.02
                > mean([e.status_code >= 400 for e in calm])
            )
        elif inc.kind == "latency_spike":
            assert (
                mean([e.latency_ms for e in during])
                > 2500
                > 2000
                > mean([e.latency_ms for e in calm])
            )
        elif inc.kind in ("token_spike", "cost_spike"):
            assert mean([e.cost_usd or 0 for e in during]) > 3 * mean(
                [e.cost_usd or 0 for e in calm]
            )
        elif inc.kind == "abusive_key":
            assert len(during) / ((inc.end - inc.start).total_seconds() / 60) > 100 > len(calm) / 30
        else:
            samples = [e for kind, _, e in events if kind == "gpu" and isinstance(e, dict)]
            hot = [
                e["utilization_gpu_pct"]
                for e in samples
                if e["gpu_index"] == int(inc.value) and inc.start <= e["ts"] < inc.end
            ]
            assert (
                min(hot)
                > 90
                > max(e["utilization_gpu_pct"] for e in samples if e["ts"] < inc.start)
            )


def _budgets(text: str) -> list[BudgetRule]:
    return [r for r in parse_rules(text, "t.yaml", (60,)).rules if isinstance(r, BudgetRule)]


def test_the_ledger_knows_the_call_that_passes_each_level_per_utc_day_and_dimension_set() -> None:
    budgets = _budgets(
        "rules:\n  - {name: tok, type: budget, metric: total_tokens, warning: 100, critical: 150, window: 60}\n"
        "  - {name: app_cost, type: budget, metric: cost_usd, by: [app], critical: 1.0, window: 60}\n"
    )
    ledger = BudgetLedger(budgets)
    calls = [  # (time, app, tokens, cost)
        (at(0), "chat", 60, 0.5),
        (at(1), "chat", 40, 0.5),  # 100 tokens: not past 100; $1.00: not past $1
        (at(2), "search", 10, 0.9),  # 110 > 100: warning; search $0.90
        (at(3), "chat", 40, 0.01),  # 150: not past 150; chat $1.01 > $1: critical
        (at(4), "chat", 1, 0.0),  # 151 > 150: critical
        (at(5), "chat", 500, 0.0),  # nothing new: each level once a day
        (T0.replace(day=3, hour=0), "chat", 200, 0.0),  # the next UTC day: both at once
    ]
    for ts, app, tokens, cost in calls:
        ledger.add(CallEventFast(model="m", ts=ts, app=app, prompt_tokens=tokens, cost_usd=cost))
    assert [(c.rule, c.severity, c.dimensions, c.at) for c in ledger.crossings] == [
        ("tok", "warning", (), at(2)),
        ("app_cost", "critical", (("app", "chat"),), at(3)),
        ("tok", "critical", (), at(4)),
        ("tok", "warning", (), T0.replace(day=3, hour=0)),
        ("tok", "critical", (), T0.replace(day=3, hour=0)),
    ]


def test_the_shipped_daily_budget_is_crossed_by_the_workload_and_labelled() -> None:
    w = plan(1, datetime(2026, 11, 2, 23, tzinfo=UTC), 2 * 3600, incidents=1)
    budgets = [r for r in load_rules(None).rules if isinstance(r, BudgetRule)]
    traffic = Traffic(w, budgets)
    calls = [e for _, _, e in traffic.events() if isinstance(e, CallEventFast)]
    got = [(c.rule, c.severity, c.level) for c in traffic.ledger.crossings]
    # the day of the start, then the next: 80k, then 100k, each day
    assert got == [("daily_tokens", "warning", 80_000), ("daily_tokens", "critical", 100_000)] * 2
    for c in traffic.ledger.crossings:
        day = c.at.replace(hour=0, minute=0, second=0, microsecond=0)
        before = sum(e.total_tokens or 0 for e in calls if day <= e.ts < c.at)
        upto = before + sum(e.total_tokens or 0 for e in calls if e.ts == c.at)
        assert before <= c.level < upto


CROSSINGS = [
    BudgetCrossing("daily_tokens", "warning", 80_000, (), at(40.5), 60),
    BudgetCrossing("daily_tokens", "critical", 100_000, (), at(42.2), 60),
    BudgetCrossing("daily_tokens", "warning", 80_000, (), at(50.5), 60),  # a day that got none
]


def test_a_budget_alert_at_its_crossing_is_expected_and_a_missing_one_is_a_miss() -> None:
    alerts = [
        alert("daily_tokens", {}, 40, rule_type="budget"),  # the window of the warning crossing
        alert("daily_tokens", {}, 43, started_min=40, severity="critical", rule_type="budget"),  # next window: on time
        alert("daily_tokens", {}, 20, rule_type="budget"),  # no crossing then: a false alert
        alert("cost_anomaly", {"app": "search"}, 30),  # false, as before
    ]
    s = score([BURST], alerts, W, at(120), CROSSINGS)
    assert (s.budget_crossings, s.budget_on_time) == (3, 2)
    assert s.budget_missed == ["daily_tokens warning (80000) on all traffic at 02 12:50:30"]
    assert dict(s.false_by_rule) == {"daily_tokens": 1, "cost_anomaly": 1}
    # an escalation two windows late is not on time (and its episode is a false alert)
    late = [alert("daily_tokens", {}, 40, rule_type="budget"), alert("daily_tokens", {}, 44, started_min=44, severity="critical", rule_type="budget")]
    s = score([], late, W, at(120), CROSSINGS[:2])
    assert (s.budget_on_time, dict(s.false_by_rule)) == (1, {"daily_tokens": 1})


def test_budget_messages_are_counted_apart_from_incidents_and_noise() -> None:
    alerts = [
        alert("daily_tokens", {}, 1, rule_type="budget"),  # a crossing inside the burst's span
        alert("daily_tokens", {}, 2, started_min=1, severity="critical", rule_type="budget"),
        alert("success_rate", {"model": "gpt-4o"}, 1),
        alert("success_rate", {"model": "gpt-4o"}, 13, state="resolved", started_min=1),
        alert("daily_tokens", {}, 100, state="resolved", started_min=1, severity="critical", rule_type="budget"),
    ]
    crossings = [
        BudgetCrossing("daily_tokens", "warning", 80_000, (), at(1.2), 60),
        BudgetCrossing("daily_tokens", "critical", 100_000, (), at(2.5), 60),
    ]
    sent = notifications(alerts, NotifyConfig(), at(120))
    s = score([BURST], alerts, W, at(120), crossings)
    attribute(sent, s, W)
    # the budget: warning, then resolved (the critical crossing edits the warning's message);
    # the burst: fired, resolved, in messages of their own
    assert (s.budget_notifications, s.incidents[0].notifications, s.notifications_outside) == (2, 2, 0)
    assert (s.notifications, s.updates, s.incidents[0].updates) == (4, 1, 0) and not s.false_by_rule
