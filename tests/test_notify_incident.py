"""Incident grouping (issue 14): one incident, one page, then one resolution."""

from __future__ import annotations

from llmpulse.sinks.notifier.grouping import Dispatcher, Flush
from tests.test_notify import make_alert
from tests.test_notify_logic import Clock, dispatcher, flush_all, sent


def test_one_incident_one_notification_then_one_resolution() -> None:
    clock = Clock()
    d = dispatcher(clock, group_by=["incident"])
    model = make_alert(rule="error_rate_anomaly", dims={"model": "gpt-4o"})
    app = make_alert(rule="error_rate_anomaly", dims={"app": "chat"})
    d.apply(model, (0, 0))
    d.apply(app, (0, 1))
    (f,) = sent(flush_all(d, clock, 10.1))
    n = f.notification
    assert n is not None and len(n.firing) == 2
    assert n.group_labels == {"incident": "model=gpt-4o since 2025-06-01T12:00:00Z"}
    # the SLO burn of the same outage fires 18 minutes later: it joins, without a message
    clock.advance(18 * 60)
    slo = make_alert(rule="success_rate", dims={"model": "gpt-4o"})
    d.apply(slo, (0, 2))
    assert sent(flush_all(d, clock, 60)) == []
    # ...and an escalation to critical is worth a message
    d.apply(make_alert(rule="success_rate", dims={"model": "gpt-4o"}, severity="critical"), (0, 3))
    (esc,) = sent(flush_all(d, clock, 60))
    assert esc.notification is not None and esc.notification.severity == "critical"
    # partial resolutions are quiet; the last one resolves the incident in one message
    d.apply(model.model_copy(update={"state": "resolved", "alert_id": "r1"}), (0, 4))
    d.apply(app.model_copy(update={"state": "resolved", "alert_id": "r2"}), (0, 5))
    assert sent(flush_all(d, clock, 60)) == []
    d.apply(slo.model_copy(update={"state": "resolved", "severity": "critical", "alert_id": "r3"}), (0, 6))
    (res,) = sent(flush_all(d, clock, 60))
    assert res.notification is not None and res.notification.firing == []
    assert [a.rule for a in res.notification.resolved] == ["success_rate"]
    assert d.groups == {}
    # the next alert opens a new incident
    d.apply(make_alert(rule="latency_avg", dims={"app": "search"}), (0, 7))
    (nxt,) = sent(flush_all(d, clock, 10.1))
    assert nxt.notification is not None and nxt.notification.group_labels["incident"].startswith("app=search")


def test_a_long_firing_alert_does_not_swallow_the_next_incident() -> None:
    from datetime import timedelta

    from tests.test_notify import T0

    clock = Clock()
    d = dispatcher(clock, group_by=["incident"])
    d.apply(make_alert(rule="daily_tokens", dims={}), (0, 0))  # fires for the rest of the day
    assert len(sent(flush_all(d, clock, 10.1))) == 1
    later = make_alert(rule="error_rate_anomaly", dims={"model": "llama"}, started_at=T0 + timedelta(hours=3))
    d.apply(later, (0, 1))
    (f,) = sent(flush_all(d, clock, 60))
    assert f.notification is not None and [a.rule for a in f.notification.firing] == ["error_rate_anomaly"]
    assert f.notification.group_labels["incident"].startswith("model=llama since ")


def test_incident_of_an_all_traffic_alert_names_its_root_cause() -> None:
    clock = Clock()
    d = dispatcher(clock, group_by=["incident"])
    glob = make_alert(rule="cost_anomaly", dims={}).model_copy(
        update={"root_cause": {"dimension": "model", "value": "gpt-4o", "metric": "cost_usd", "share": 0.9}}
    )
    d.apply(glob, (0, 0))
    (f,) = sent(flush_all(d, clock, 10.1))
    assert f.notification is not None
    assert f.notification.group_labels["incident"].startswith("model=gpt-4o since ")


def test_an_unrelated_outage_within_the_hour_gets_its_own_page() -> None:
    """A budget alert or an incident on one model must not swallow the next outage's page;
    the same model's SLO burn 45 minutes later still joins its incident."""
    from datetime import timedelta

    from tests.test_notify import T0

    clock = Clock()
    d = dispatcher(clock, group_by=["incident"])
    d.apply(make_alert(rule="daily_tokens", dims={}), (0, 0))
    d.apply(make_alert(rule="error_rate_anomaly", dims={"model": "gpt-4o"}, started_at=T0 + timedelta(minutes=40)), (0, 1))
    pages = sent(flush_all(d, clock, 10.1))
    assert sorted(p.notification.group_labels["incident"].split(" ")[0] for p in pages if p.notification) == [
        "daily_tokens", "model=gpt-4o",
    ]
    # 45 minutes later: the same model's SLO burn joins quietly, another model's burst pages
    clock.advance(45 * 60)
    d.apply(make_alert(rule="success_rate", dims={"model": "gpt-4o", "app": "chat"}, started_at=T0 + timedelta(minutes=85)), (0, 2))
    d.apply(make_alert(rule="latency_avg", dims={"model": "llama"}, started_at=T0 + timedelta(minutes=86)), (0, 3))
    (page,) = sent(flush_all(d, clock, 60))
    assert page.notification is not None
    assert [a.rule for a in page.notification.firing] == ["latency_avg"]
    assert page.notification.group_labels["incident"].startswith("model=llama since ")


def test_a_budget_alert_pages_once_escalates_once_and_is_never_repeated() -> None:
    """A daily budget: one page at warning, one at critical, no reminder all day (the breach
    does not get better by waiting), one resolution; incidents of that hour page on their own."""
    from datetime import timedelta

    from tests.test_notify import T0

    clock = Clock()
    d = dispatcher(clock, group_by=["incident"], repeat_interval_s=4 * 3600)
    budget = make_alert(rule="daily_tokens", dims={}).model_copy(update={"rule_type": "budget"})
    d.apply(budget, (0, 0))
    (first,) = sent(flush_all(d, clock, 10.1))
    assert first.notification is not None and first.notification.group_labels["budget"] == "daily_tokens"
    # an outage 5 minutes later does not join the budget's group: it pages on its own
    outage = make_alert(rule="error_rate_anomaly", dims={"model": "gpt-4o"}, started_at=T0 + timedelta(minutes=5))
    d.apply(outage, (0, 1))
    (page,) = sent(flush_all(d, clock, 60))
    assert page.notification is not None and [a.rule for a in page.notification.firing] == ["error_rate_anomaly"]
    # ...and the budget's escalation does not join the outage's incident either
    d.apply(budget.model_copy(update={"severity": "critical", "alert_id": "esc"}), (0, 2))
    (esc,) = sent(flush_all(d, clock, 60))
    assert esc.notification is not None and esc.notification.severity == "critical"
    assert [a.rule for a in esc.notification.firing] == ["daily_tokens"]
    d.apply(outage.model_copy(update={"state": "resolved", "alert_id": "r0"}), (0, 3))
    assert len(sent(flush_all(d, clock, 60))) == 1
    # 20 hours still over budget: no reminder (a threshold alert would get 5)
    reminders = [f for _ in range(20 * 60) for f in sent(flush_all(d, clock, 60))]
    assert reminders == []
    # the UTC day rolls over: one resolution
    d.apply(budget.model_copy(update={"state": "resolved", "severity": "critical", "alert_id": "r1"}), (0, 4))
    (res,) = sent(flush_all(d, clock, 60))
    assert res.notification is not None and [a.rule for a in res.notification.resolved] == ["daily_tokens"]
    assert d.groups == {}


def test_other_alerts_are_still_repeated() -> None:
    clock = Clock()
    d = dispatcher(clock, group_by=["incident"], repeat_interval_s=4 * 3600)
    d.apply(make_alert(rule="latency_avg", dims={"model": "gpt-4o"}).model_copy(update={"rule_type": "threshold"}), (0, 0))
    assert len(sent(flush_all(d, clock, 10.1))) == 1
    reminders = [f for _ in range(9 * 60) for f in sent(flush_all(d, clock, 60))]
    assert len(reminders) == 2  # after 4 h and 8 h


def test_a_new_days_budget_alert_pages_even_when_yesterdays_resolves_in_the_same_window() -> None:
    from datetime import timedelta

    from tests.test_notify import T0

    clock = Clock()
    d = dispatcher(clock, group_by=["incident"])
    budget = make_alert(rule="daily_tokens", dims={}, severity="critical").model_copy(update={"rule_type": "budget"})
    d.apply(budget, (0, 0))
    assert len(sent(flush_all(d, clock, 10.1))) == 1
    # 00:00 UTC: the engine resolves yesterday's alert and fires today's in one window
    today = T0 + timedelta(hours=12)
    d.apply(budget.model_copy(update={"state": "resolved", "alert_id": "r"}), (0, 1))
    d.apply(budget.model_copy(update={"alert_id": "new", "severity": "warning", "started_at": today}), (0, 2))
    got = sent(flush_all(d, clock, 60))
    got += sent(flush_all(d, clock, 60))
    kinds = sorted(
        ("resolved", a.started_at) if a.state == "resolved" else ("firing", a.started_at)
        for f in got
        if f.notification is not None
        for a in (*f.notification.firing, *f.notification.resolved)
    )
    assert kinds == [("firing", today), ("resolved", T0)]
    # today's escalation goes to today's group, and is news
    d.apply(budget.model_copy(update={"alert_id": "esc", "started_at": today}), (0, 3))
    (esc,) = sent(flush_all(d, clock, 300))
    assert esc.notification is not None and [a.started_at for a in esc.notification.firing] == [today]


# -- one incident, one message kept current: updates edit the page --------------------------------
def flush_delivered(d: Dispatcher, clock: Clock, advance: float = 0.0) -> list[Flush]:
    """flush_all, with each message taken by a receiver that can edit: a page answers a new
    handle (a Slack ts), an update the handle it edited (as SlackReceiver with a bot token)."""
    clock.advance(advance)
    out = []
    for g in d.due():
        f = d.plan(g)
        n = f.notification
        record = None
        if n is not None:
            handle = n.message_ref if n.update else {"channel": "C0ALERTS", "ts": f"{clock.t:.6f}"}
            record = n.logged(handle) if n.send else n.record
        d.complete(f, record)
        out.append(f)
    return out


def test_after_the_page_an_escalation_a_join_and_a_partial_resolution_are_updates() -> None:
    clock = Clock()
    d = dispatcher(clock, group_by=["incident"])
    model = make_alert(rule="error_rate_anomaly", dims={"model": "gpt-4o"})
    d.apply(model, (0, 0))
    (page,) = sent(flush_delivered(d, clock, 10.1))
    assert page.notification is not None and not page.notification.update
    handle = d.nflog[page.group.gid].message_ref
    assert handle == {"channel": "C0ALERTS", "ts": "1010.100000"}  # the page's, kept in the log
    # the same alert escalates to critical: an update of the page, carrying its handle
    d.apply(model.model_copy(update={"severity": "critical", "alert_id": "esc"}), (0, 1))
    (esc,) = sent(flush_delivered(d, clock, 60))
    n = esc.notification
    assert n is not None and n.update and n.severity == "critical"
    assert n.message_ref == handle and n.escalated == {model.fingerprint}
    assert esc.group.gid == page.group.gid
    # an alert joining is an update too (it used to be recorded without a message)
    app = make_alert(rule="error_rate_anomaly", dims={"app": "chat"})
    d.apply(app, (0, 2))
    (join,) = sent(flush_delivered(d, clock, 60))
    assert join.notification is not None and join.notification.update
    assert join.notification.new == {app.fingerprint} and join.notification.escalated == set()
    # one of two resolving: an update listing it
    d.apply(app.model_copy(update={"state": "resolved", "alert_id": "r-app"}), (0, 3))
    (part,) = sent(flush_delivered(d, clock, 60))
    assert part.notification is not None and part.notification.update
    assert [a.rule for a in part.notification.resolved] == ["error_rate_anomaly"]
    assert [a.fingerprint for a in part.notification.firing] == [model.fingerprint]
    assert d.nflog[page.group.gid].message_ref == handle  # every update edited the page
    # nothing changed: nothing sent
    assert sent(flush_delivered(d, clock, 60)) == []
    # the last one resolving: a new message, and the record forgets the handle
    d.apply(model.model_copy(update={"state": "resolved", "severity": "critical", "alert_id": "r-m"}), (0, 4))
    (res,) = sent(flush_delivered(d, clock, 60))
    assert res.notification is not None and not res.notification.update
    assert res.notification.firing == [] and res.notification.message_ref == handle
    assert d.nflog[page.group.gid].message_ref == {}
    assert d.groups == {}


def test_a_reminder_is_a_new_message_and_later_updates_still_edit_the_page() -> None:
    clock = Clock()
    d = dispatcher(clock, group_by=["incident"], repeat_interval_s=3600)
    alert = make_alert(rule="latency_avg", dims={"model": "gpt-4o"}).model_copy(update={"rule_type": "threshold"})
    d.apply(alert, (0, 0))
    (page,) = sent(flush_delivered(d, clock, 10.1))
    handle = d.nflog[page.group.gid].message_ref
    assert handle
    reminders = [f for _ in range(61) for f in sent(flush_delivered(d, clock, 60))]
    (rem,) = reminders
    assert rem.notification is not None and not rem.notification.update
    assert d.nflog[page.group.gid].message_ref == handle  # the reminder did not replace it
    d.apply(alert.model_copy(update={"severity": "critical", "alert_id": "esc"}), (0, 1))
    (esc,) = sent(flush_delivered(d, clock, 300))
    assert esc.notification is not None and esc.notification.update and esc.notification.message_ref == handle


def test_without_a_handle_an_escalation_is_a_new_message_and_a_join_is_quiet() -> None:
    """A receiver that cannot edit (a Slack incoming webhook) or a page that failed: no handle."""
    clock = Clock()
    d = dispatcher(clock, group_by=["incident"])
    model = make_alert(rule="error_rate_anomaly", dims={"model": "gpt-4o"})
    d.apply(model, (0, 0))
    (page,) = sent(flush_all(d, clock, 10.1))  # logged without a handle
    assert d.nflog[page.group.gid].message_ref == {}
    d.apply(make_alert(rule="error_rate_anomaly", dims={"app": "chat"}), (0, 1))
    assert sent(flush_all(d, clock, 60)) == []
    d.apply(model.model_copy(update={"severity": "critical", "alert_id": "esc"}), (0, 2))
    (esc,) = sent(flush_all(d, clock, 60))
    assert esc.notification is not None and not esc.notification.update
    assert esc.notification.severity == "critical"


def test_a_page_that_failed_leaves_no_handle_so_the_escalation_pages_again() -> None:
    clock = Clock()
    d = dispatcher(clock, group_by=["incident"])
    model = make_alert(rule="error_rate_anomaly", dims={"model": "gpt-4o"})
    d.apply(model, (0, 0))
    clock.advance(10.1)
    (g,) = d.due()
    f = d.plan(g)
    assert f.notification is not None
    # what the service logs when the receiver failed permanently: the planned record, failed
    d.complete(f, f.notification.record.model_copy(update={"status": "failed", "error": "invalid_auth"}))
    d.apply(model.model_copy(update={"severity": "critical", "alert_id": "esc"}), (0, 1))
    (esc,) = sent(flush_delivered(d, clock, 60))
    assert esc.notification is not None and not esc.notification.update
    # ...and that message's handle is what the incident's later updates edit
    ts = d.nflog[g.gid].message_ref["ts"]
    d.apply(make_alert(rule="error_rate_anomaly", dims={"app": "chat"}), (0, 2))
    (join,) = sent(flush_delivered(d, clock, 60))
    assert join.notification is not None and join.notification.update
    assert join.notification.message_ref["ts"] == ts


def test_other_grouping_keeps_a_new_message_per_change() -> None:
    """group_by: [rule] (Alertmanager's groups): an escalation is a new message, handle or not."""
    clock = Clock()
    d = dispatcher(clock, group_by=["rule"])
    alert = make_alert()
    d.apply(alert, (0, 0))
    (page,) = sent(flush_delivered(d, clock, 10.1))
    d.apply(alert.model_copy(update={"severity": "critical", "alert_id": "esc"}), (0, 1))
    (esc,) = sent(flush_delivered(d, clock, 60))
    assert esc.group.gid == page.group.gid
    assert esc.notification is not None and not esc.notification.update
    assert esc.notification.severity == "critical" and esc.notification.new == {alert.fingerprint}
