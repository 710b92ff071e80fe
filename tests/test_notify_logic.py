"""The notifier's decisions without Kafka: grouping, pacing, muting, restart state, messages, config."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from llmpulse.config.notify import NotifyConfig
from llmpulse.errors import LLMPulseError
from llmpulse.schemas import Alert, encode
from llmpulse.sinks.notifier.blocks import dashboard_link, slack_message
from llmpulse.sinks.notifier.delivery import Backoff
from llmpulse.sinks.notifier.grouping import Dispatcher, Flush
from llmpulse.sinks.notifier.models import DeliveryRecord, Silence
from llmpulse.sinks.notifier.receivers import build_receivers
from llmpulse.sinks.notifier.routing import Router
from llmpulse.sinks.notifier.silences import SilenceStore
from tests.test_notify import T0, make_alert


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0
        self.wall = datetime(2025, 6, 1, 12, 5, tzinfo=UTC)

    def mono(self) -> float:
        return self.t

    def now(self) -> datetime:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.t += seconds
        self.wall += timedelta(seconds=seconds)


def dispatcher(clock: Clock, silences: SilenceStore | None = None, **cfg: Any) -> Dispatcher:
    conf = NotifyConfig.model_validate(
        # these tests group by rule (Alertmanager's groups); test_notify_incident.py: the default
        {"group_by": ["rule"], "group_wait_s": 10, "group_interval_s": 60, "repeat_interval_s": 3600, **cfg}
    )
    return Dispatcher(Router(conf), silences or SilenceStore(), clock=clock.mono, wallclock=clock.now)


def flush_all(d: Dispatcher, clock: Clock, advance: float = 0.0) -> list[Flush]:
    clock.advance(advance)
    out = []
    for g in d.due():
        f = d.plan(g)
        d.complete(f, f.notification.record if f.notification else None)
        out.append(f)
    return out


def sent(flushes: list[Flush]) -> list[Flush]:
    return [f for f in flushes if f.notification is not None and f.notification.send]


def test_group_wait_interval_and_repeat() -> None:
    clock = Clock()
    d = dispatcher(clock)
    for i in range(5):
        d.apply(make_alert(dims={"model": f"m{i}"}), (0, i))
    assert flush_all(d, clock, 9.9) == []  # still in group_wait
    (f,) = sent(flush_all(d, clock, 0.2))
    assert f.notification is not None and len(f.notification.firing) == 5 and len(f.notification.new) == 5
    # nothing new: group_interval ticks send nothing
    assert sent(flush_all(d, clock, 60)) == []
    # a new alert waits for the next group_interval tick, and is marked new
    d.apply(make_alert(dims={"model": "m9"}), (0, 9))
    assert sent(flush_all(d, clock, 30)) == []
    (f,) = sent(flush_all(d, clock, 30))
    assert f.notification is not None and f.notification.new == {make_alert(dims={"model": "m9"}).fingerprint}
    assert len(f.notification.firing) == 6
    # still firing after repeat_interval: one reminder
    clock.advance(3600)
    (f,) = sent(flush_all(d, clock, 0))
    assert f.notification is not None and not f.notification.new and len(f.notification.firing) == 6


def test_refs_are_released_only_when_handled_and_muted_alerts_keep_theirs() -> None:
    clock = Clock()
    store = SilenceStore()
    silence = Silence(
        rule="error_rate", dimensions={"model": "quiet"}, starts_at=clock.now(), ends_at=clock.now() + timedelta(hours=1)
    )
    store.apply(silence.silence_id, encode(silence))
    d = dispatcher(clock, store)
    assert d.apply(make_alert(dims={"model": "loud"}), (0, 1)) == 1
    assert d.apply(make_alert(dims={"model": "quiet"}), (0, 2)) == 1
    clock.advance(10)
    (group,) = d.due()
    f = d.plan(group)
    assert f.notification is not None and [a.dimensions["model"] for a in f.notification.firing] == ["loud"]
    assert d.complete(f, f.notification.record) == [(0, 1)]  # the silenced one stays held
    # the silence ends: the alert is notified at the next tick and its ref released
    store.apply(silence.silence_id, encode(silence.model_copy(update={"ends_at": clock.now()})))
    clock.advance(60)
    (group,) = d.due()
    f = d.plan(group)
    assert f.notification is not None and f.notification.new == {make_alert(dims={"model": "quiet"}).fingerprint}
    assert d.complete(f, f.notification.record) == [(0, 2)]


def test_restart_state_comes_from_the_delivery_log() -> None:
    clock = Clock()
    d1 = dispatcher(clock)
    firing = make_alert(severity="critical")
    d1.apply(firing, (0, 1))
    (f,) = sent(flush_all(d1, clock, 10))
    record = DeliveryRecord.model_validate_json(encode(f.notification.record))  # type: ignore[union-attr]
    resolved = firing.model_copy(update={"state": "resolved", "alert_id": "r"})
    d1.apply(resolved, (0, 2))
    (f2,) = sent(flush_all(d1, clock, 60))
    record2 = f2.notification.record  # type: ignore[union-attr]
    assert f2.notification is not None and f2.notification.resolved == [resolved]
    # a restart that replays the firing alert after the first record: nothing new
    d2 = dispatcher(clock)
    d2.restore(record)
    d2.apply(firing, (0, 1))
    assert sent(flush_all(d2, clock, 60)) == []
    # ... and the resolution, after the first record, is sent once, with the same id
    d2.apply(resolved, (0, 2))
    (again,) = sent(flush_all(d2, clock, 60))
    assert again.notification is not None and again.notification.notification_id == record2.notification_id
    # a restart after the second record: the replayed firing alert is recognised as stale
    d3 = dispatcher(clock)
    d3.restore(record2)
    assert d3.apply(firing, (0, 1)) == 0
    assert d3.groups == {}


def test_inhibition_and_escalation() -> None:
    clock = Clock()
    d = dispatcher(clock)
    warning = make_alert()
    d.apply(warning, (0, 1))
    (f,) = sent(flush_all(d, clock, 10))
    d.apply(warning.model_copy(update={"severity": "critical", "alert_id": "c"}), (0, 2))
    (f,) = sent(flush_all(d, clock, 60))
    assert f.notification is not None and f.notification.firing[0].severity == "critical"
    assert f.notification.new == {warning.fingerprint}  # escalation is news
    d.apply(warning.model_copy(update={"alert_id": "w2"}), (0, 3))  # de-escalation: muted
    assert sent(flush_all(d, clock, 60)) == []


def test_slack_message_fits_block_kit_and_links_to_the_dashboard() -> None:
    clock = Clock()
    d = dispatcher(clock)
    for i in range(60):
        d.apply(make_alert(dims={"model": f"m{i:02d}", "app": "chat"}), (0, i))
    (f,) = sent(flush_all(d, clock, 10))
    assert f.notification is not None
    text, blocks = slack_message(f.notification, "https://dash.example/", clock.now())
    assert len(blocks) <= 50 and blocks[0]["type"] == "header"
    assert "60 firing" in blocks[0]["text"]["text"] and "60 firing" in text
    assert all(len(b["text"]["text"]) <= 3000 for b in blocks if b["type"] == "section")
    link = dashboard_link("https://dash.example/", make_alert(dims={"model": "a b", "app": "chat"}))
    assert link == (
        "https://dash.example/?alert=error_rate%7Capp%3Dchat%2Cmodel%3Da+b"
        "&from=2025-06-01T12%3A00%3A00Z&to=2025-06-01T12%3A01%3A00Z&app=chat&model=a+b"
    )
    assert T0.minute == 0


def test_config_keeps_secrets_out_and_names_what_is_wrong() -> None:
    with pytest.raises(ValidationError, match="String should match pattern"):
        NotifyConfig.model_validate(
            {"receivers": {"s": {"type": "slack", "webhook_url_env": "https://hooks.slack.com/services/X"}}}
        )
    with pytest.raises(ValidationError, match="set exactly one of webhook_url_env or token_env"):
        NotifyConfig.model_validate({"receivers": {"s": {"type": "slack"}}})
    with pytest.raises(ValidationError, match="unknown receiver"):
        NotifyConfig.model_validate({"routes": [{"receivers": ["pager"]}]})
    cfg = NotifyConfig.model_validate(
        {"receivers": {"s": {"type": "slack", "token_env": "MY_TOKEN", "channel": "#x"}}, "default_receivers": ["s"]}
    )
    with pytest.raises(LLMPulseError, match="environment variable MY_TOKEN"):
        build_receivers(cfg, environ={})
    assert set(build_receivers(cfg, environ={"MY_TOKEN": "xoxb-1"})) == {"s"}


def test_routes_first_match_unless_continue() -> None:
    cfg = NotifyConfig.model_validate(
        {
            "receivers": {"a": {"type": "log"}, "b": {"type": "log"}, "c": {"type": "log"}},
            "routes": [
                {"name": "crit", "severity": ["critical"], "receivers": ["a"], "continue_matching": True},
                {"name": "gpt", "dimensions": {"model": "gpt-*"}, "receivers": ["b"]},
                {"name": "rest", "rules": ["*"], "receivers": ["c"]},
            ],
        }
    )
    router = Router(cfg)

    def names(a: Alert) -> list[str]:
        return [r.name for r in router.match(a)]

    assert names(make_alert(severity="critical", dims={"model": "gpt-4o"})) == ["crit", "gpt"]
    assert names(make_alert(dims={"model": "claude"})) == ["rest"]
    assert names(make_alert(severity="critical", dims={"model": "claude"})) == ["crit", "rest"]


def test_backoff_doubles_to_the_cap() -> None:
    b = Backoff(0.5, 4.0, jitter=lambda: 0.0)
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
