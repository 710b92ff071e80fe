"""SLO burn-rate rules: multiwindow, multi-burn-rate alerts and the error budget (issue 14)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmpulse.streams.rules import SloRule
from llmpulse.streams.rules.slo import add_window, budget_remaining, burn_rate
from tests.rules_helpers import Runner, calls, engine

SLO = """
rules:
  - name: success_slo
    type: slo
    objective: 0.99
    period: 30d
    alerts:
      - {long: 1h, short: 5m, burn_rate: 14.4, severity: critical}
      - {long: 6h, short: 30m, burn_rate: 6, severity: warning}
    window: 60
    by: [model]
    min_requests: 20
"""
M = {"model": "m"}


def test_a_slow_burn_fires_the_warning_pair_and_not_the_critical_pair() -> None:
    """100 calls a minute; 1% budget (objective 99%).

    Calm for 6 hours: 200 calls a minute, 1 error (0.5%, burn 0.5). Then 100 calls a minute
    with 8 errors (8%, burn 8) for 7 hours:
    - critical pair (1h and 5m > 14.4): never, no window burns more than 8;
    - warning pair (6h and 30m > 6): the 30-minute window burns 8 from its first minute; after
      t minutes of the burn the 6-hour window holds (360 - t) calm minutes and t burning ones:
      burn = (360 - t + 8 t) / (200 (360 - t) + 100 t) / 1% > 6  <=>  360 + 7 t > 0.06 (72000
      - 100 t) = 4320 - 6 t  <=>  13 t > 3960  <=>  t > 304.6: minute t = 305 of the burn
      (window index 360 + 304) fires the warning.
    """
    r = Runner(engine(SLO))
    i = 0
    for _ in range(360):
        r.feed(calls(i, 200, 1, dims=M))  # 0.5%
        i += 1
    assert r.alerts == []
    out: list[int] = []
    for _ in range(7 * 60):
        if r.feed(calls(i, 100, 8, dims=M)):
            out.append(i)
        i += 1
    assert r.events() == [("success_slo", "firing", "warning")]
    assert out == [360 + 304]
    [a] = r.alerts
    assert (a.metric, a.threshold, a.dimensions) == ("burn_rate", 6, M)
    ev = a.evidence or {}
    # the 6-hour window: 55 minutes of 1 error in 200 calls and 305 of 8 in 100: burn 6.012
    bad, total = 55 * 1 + 305 * 8, 55 * 200 + 305 * 100
    assert ev["burn_rate_long"] == pytest.approx(round(bad / total / 0.01, 4))
    assert ev["burn_rate_short"] == pytest.approx(8.0)
    assert (ev["long_window_s"], ev["short_window_s"]) == (21600, 1800)
    assert bad / total / 0.01 == pytest.approx(6.012, abs=1e-3)
    # the budget (one UTC day so far): 360 x 1 + 305 x 8 bad of 360 x 200 + 305 x 100 calls,
    # over the 1% allowed: 2800 / 102500 / 0.01 = 2.73 budgets spent
    spent = (360 + 305 * 8) / (360 * 200 + 305 * 100) / 0.01
    assert ev["error_budget_remaining"] == pytest.approx(1 - spent, abs=1e-5)
    assert "success SLO 99% over 30d" in a.summary and "(warning)" in a.summary


def test_a_fast_burn_fires_critical_and_a_short_blip_does_not() -> None:
    r = Runner(engine(SLO))
    for i in range(60):
        r.feed(calls(i, 100, 0, dims=M))
    # 3 minutes of 50% errors: the 5m window burns 150 / 500 / 1% = 30x, the 1h window
    # 150 / 6000 / 1% = 2.5x: a blip, no page
    for i in range(60, 63):
        r.feed(calls(i, 100, 50, dims=M))
    assert r.alerts == []
    fired: dict[str, int] = {}
    for i in range(63, 90):
        for a in r.feed(calls(i, 100, 50, dims=M)):
            fired[a.severity] = i
    # the 6h window holds only the 60 + k minutes seen so far: 50 k / (6000 + 100 k) / 1% > 6
    # <=> 44 k > 360 <=> k > 8.2: the warning pair fires at minute k = 9 (index 68);
    # the hour holds 50 k bad of 6000 calls: 50 k / 6000 / 1% > 14.4 <=> k > 17.28: critical at
    # minute k = 18 (index 77), an escalation of the same alert
    assert r.events() == [("success_slo", "firing", "warning"), ("success_slo", "firing", "critical")]
    assert fired == {"warning": 60 + 8, "critical": 60 + 17}
    # recovery: the short windows clear first (the warning pair's 30 minutes last), so the
    # alert resolves while the long windows still show the burn
    for i in range(90, 130):
        r.feed(calls(i, 100, 0, dims=M))
    assert r.events()[-1] == ("success_slo", "resolved", "critical")
    # the 30m window burns 50 j / 3000 / 1% for j burning minutes in it: <= 6 once j <= 3, first
    # at index 116 (window 87..116); resolve_after 2: resolved at index 117
    assert r.alerts[-1].window_start == calls(117, 1).window_start


def test_ring_buffers_are_bounded_and_survive_gaps() -> None:
    rule = SloRule.model_validate(
        {"name": "s", "type": "slo", "objective": 0.999, "window": 60, "period": "7d"}
    )
    st: dict[str, Any] = {}
    t0 = 1_700_000_040 - 1_700_000_040 % 60
    for i in range(3 * 1440):
        add_window(rule, st, t0 + i * 60, 10, 1 if i % 100 == 0 else 0)
    assert len(st["t"]) == len(st["b"]) == 360  # the longest span: 6 h of 60 s windows
    assert len(json.dumps(st)) < 4000
    # the running sums equal a recount of the last windows
    last = 3 * 1440 - 1
    for span in (3600, 300, 21600, 1800):
        n = span // 60
        bad = sum(1 for i in range(last - n + 1, last + 1) if i % 100 == 0)
        assert st["sums"][str(span)] == [10 * n, bad]
        rate, total, b = burn_rate(rule, st, span)
        assert (total, b) == (10 * n, bad) and rate == pytest.approx(bad / (10 * n) / 0.001)
    # a gap of 2 hours: the 1h window holds nothing, the 6h window 4 hours of history
    add_window(rule, st, t0 + (last + 121) * 60, 10, 0)
    assert st["sums"]["3600"] == [10, 0]
    assert st["sums"]["21600"][0] == 10 * (240 - 1) + 10
    # a gap longer than every span starts over; the period's days are kept
    add_window(rule, st, t0 + (last + 1000) * 60, 5, 5)
    assert st["sums"]["21600"] == [5, 5] and len(st["days"]) <= 7
    assert budget_remaining(rule, st) < 1.0


def test_slo_rule_validation() -> None:
    with pytest.raises(ValueError, match="shorter than 'long'"):
        SloRule.model_validate(
            {"name": "s", "objective": 0.99, "alerts": [{"long": "5m", "short": "1h", "burn_rate": 2}]}
        )
    with pytest.raises(ValueError, match="whole days"):
        SloRule.model_validate({"name": "s", "objective": 0.99, "period": "36h"})
    with pytest.raises(ValueError):
        SloRule.model_validate({"name": "s", "objective": 1.0})


def test_the_alert_says_why_in_slack_text_and_the_alerts_table_row() -> None:
    from datetime import timedelta

    from llmpulse.schemas.alert import evidence_text
    from llmpulse.sinks.clickhouse.rows import ALERT_COLUMNS, alert_row
    from llmpulse.sinks.notifier.blocks import alert_text

    r = Runner(engine(SLO))
    for i in range(30):
        r.feed(calls(i, 100, 30, dims=M))  # 30% errors: burn 30x everywhere
    [a] = r.alerts
    assert a.severity == "critical"
    why = evidence_text(a.evidence)
    assert why.startswith("error budget burning 30x over 1h and 30x over 5m (alert above 14.4x)")
    assert "% of the error budget left" in why
    text = alert_text(a, "http://dash", a.window_end + timedelta(minutes=1))
    assert "_evidence:_ error budget burning 30x" in text and "(expected 0..1)" in text
    row = dict(zip(ALERT_COLUMNS, alert_row(a), strict=True))
    assert (row["expected_low"], row["expected_high"]) == (0.0, 1.0)
    assert json.loads(row["evidence"])["burn_rate_threshold"] == 14.4


def test_every_surface_words_the_evidence_the_same() -> None:
    """One formatter (schemas/alert.py): the alert's summary, Slack, the webhook's `why`."""
    from datetime import timedelta

    from llmpulse.schemas.alert import evidence_text
    from llmpulse.sinks.notifier.blocks import alert_text, plain_text, webhook_payload
    from llmpulse.sinks.notifier.grouping import Notification
    from llmpulse.sinks.notifier.models import DeliveryRecord

    r = Runner(engine(SLO))
    for i in range(30):
        r.feed(calls(i, 100, 30, dims=M))
    [a] = r.alerts
    why = a.why()
    assert why == evidence_text(a.evidence)
    assert why.startswith(
        "error budget burning 30x over 1h and 30x over 5m (alert above 14.4x), "
        "30 of 100 calls failed over 1h, "
    )
    assert why in a.summary
    assert f"_evidence:_ {why}" in alert_text(a, "http://dash", a.window_end + timedelta(minutes=1))
    record = DeliveryRecord(group_id="g", route="default", receiver="r", group_key="k",
                            notification_id="n1", seq=1)  # fmt: skip
    n = Notification("n1", "g", "default", "r", "k", {}, [a], {a.fingerprint}, [], record)
    assert webhook_payload(n, "http://dash")["firing"][0]["why"] == why
    assert f"({why})" in plain_text(n, "http://dash")
