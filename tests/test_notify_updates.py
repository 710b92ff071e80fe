"""One incident, one message kept current (issue 14): after the page, a change edits it.

Slack with a bot token against a local Slack Web API (slack-sdk's AsyncWebClient, the real
client): the escalation is chat.update of the page's ts plus a thread reply, no second
message to the channel; after a restart the handle comes back from the delivery log. The
signed webhook marks the update as one of the same incident. A deleted page and an
incoming webhook (which cannot edit) fall back to a new message.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from llmpulse.config import Settings
from llmpulse.config.notify import SlackReceiverConfig
from llmpulse.sinks.notifier.grouping import Notification
from llmpulse.sinks.notifier.receivers import LogReceiver, SlackReceiver
from tests.fake_slack import FakeSlack, Message
from tests.test_notify import (
    FAST,
    T0,
    TOKEN_ENV,
    WEBHOOK_ENV,
    SigningServer,
    make_alert,
    publish,
    running,
)
from tests.test_notify_logic import Clock, dispatcher

INCIDENT = {**FAST, "notify.group_by": ["incident"]}


def bot_settings(make_settings: Callable[..., Settings], fake: FakeSlack) -> Settings:
    return make_settings(
        **INCIDENT,
        **{
            "notify.receivers": {
                "slack": {"type": "slack", "token_env": TOKEN_ENV, "channel": "#alerts", "base_url": fake.api_base_url}
            },
            "notify.default_receivers": ["slack"],
        },
    )


def other_incident() -> Any:
    """An alert two hours later on another model: its own incident, its own page."""
    return make_alert(rule="control", dims={"model": "llama"}, started_at=T0 + timedelta(hours=2))


def test_slack_escalation_edits_the_page_and_replies_in_its_thread(make_settings: Callable[..., Settings]) -> None:
    warning = make_alert(value=0.12)
    with FakeSlack() as fake:
        settings = bot_settings(make_settings, fake)
        with running(settings, {TOKEN_ENV: fake.token}):
            publish(settings, [warning])
            (page,) = fake.wait_count(1)
            assert page.header.startswith("[WARNING]") and page.ts
            publish(settings, [warning.model_copy(update={"severity": "critical", "value": 0.31, "alert_id": "esc"})])
            (edit,) = fake.wait_edits(1)
            fake.wait_for(lambda ms: any(m.thread_ts == page.ts for m in ms), what="the thread reply")
            publish(settings, [warning.model_copy(update={"state": "resolved", "severity": "critical", "alert_id": "r"})])
            fake.wait_for(lambda ms: len([m for m in ms if m.thread_ts is None]) >= 2, what="the resolution")
            publish(settings, [other_incident()])
            fake.wait_for(lambda ms: len([m for m in ms if m.thread_ts is None]) >= 3, what="the control page")
            top = fake.top_level()
            replies = fake.replies(page.ts)
            edits = list(fake.edits)
    # the escalation edited the page in place: same channel and ts, now critical with the new value
    assert (edit.channel, edit.ts) == ("#alerts", page.ts)
    assert top[0] is page and page.edits == 1
    assert page.header.startswith("[CRITICAL]") and "error_rate *0.31*" in page.body_text
    assert any("updated" in str(el.get("text")) for b in page.blocks for el in b.get("elements", []))
    # ...with one reply in its thread saying what changed, and no second message to the channel
    assert [r.text for r in replies] == ["escalated to critical: error_rate on model=gpt-4o"]
    assert [m.header.split(" ")[0] for m in top] == ["[CRITICAL]", "[RESOLVED]", "[WARNING]"]
    assert "control" in top[2].body_text
    assert len(edits) == 1


def test_after_a_restart_the_update_edits_the_page_named_in_the_delivery_log(
    make_settings: Callable[..., Settings],
) -> None:
    warning = make_alert(rule="latency_avg", dims={"app": "chat"})
    with FakeSlack() as fake:
        settings = bot_settings(make_settings, fake)
        env = {TOKEN_ENV: fake.token}
        with running(settings, env):
            publish(settings, [warning])
            (page,) = fake.wait_count(1)
        # a new notifier: nothing in memory, the page's channel and ts only in the delivery log
        with running(settings, env):
            publish(settings, [warning.model_copy(update={"severity": "critical", "alert_id": "esc"})])
            (edit,) = fake.wait_edits(1)
            fake.wait_for(lambda ms: any(m.thread_ts == page.ts for m in ms), what="the thread reply")
            publish(settings, [other_incident()])
            fake.wait_for(lambda ms: len([m for m in ms if m.thread_ts is None]) >= 2, what="the control page")
            top = fake.top_level()
    assert (edit.channel, edit.ts) == ("#alerts", page.ts)
    assert page.header.startswith("[CRITICAL]")
    assert [m.ts for m in top] == [page.ts, top[1].ts] and "control" in top[1].body_text
    assert [r.text for r in fake.replies(page.ts)] == ["escalated to critical: latency_avg on app=chat"]


def test_webhook_update_is_marked_as_one_of_the_same_incident(make_settings: Callable[..., Settings]) -> None:
    hook = SigningServer(200)
    warning = make_alert()
    try:
        settings = make_settings(
            **INCIDENT,
            **{
                "notify.receivers": {"hook": {"type": "webhook", "url": hook.url}},
                "notify.default_receivers": ["hook"],
            },
        )
        with running(settings, {}):
            publish(settings, [warning])
            hook.wait(1)
            publish(settings, [warning.model_copy(update={"severity": "critical", "alert_id": "esc"})])
            hook.wait(2)
            publish(settings, [warning.model_copy(update={"state": "resolved", "severity": "critical", "alert_id": "r"})])
            hook.wait(3)
    finally:
        hook.close()
    payloads = [json.loads(body) for _, body in hook.requests]
    headers = [h for h, _ in hook.requests]
    page, update, resolution = payloads
    assert len({p["incident_id"] for p in payloads}) == 1 and page["incident_id"].endswith(page["group_key"])
    assert [p["update"] for p in payloads] == [False, True, False]
    assert "incident_notification_id" not in page
    assert update["incident_notification_id"] == page["notification_id"] != update["notification_id"]
    assert update["severity"] == "critical" and update["status"] == "firing"
    assert update["changes"] == ["escalated to critical: error_rate on model=gpt-4o"]
    assert resolution["status"] == "resolved" and resolution["incident_notification_id"] == page["notification_id"]
    assert [h["X-LLMPulse-Notification-Id"] for h in headers] == [p["notification_id"] for p in payloads]


def _escalation(clock: Clock, receiver_send: Callable[[Notification], Any]) -> tuple[Notification, Notification]:
    """The page of a warning, then the update of its escalation, through `receiver_send`."""
    d = dispatcher(clock, group_by=["incident"])
    warning = make_alert()
    d.apply(warning, (0, 0))
    clock.advance(10.1)
    (g,) = d.due()
    f = d.plan(g)
    page = f.notification
    assert page is not None
    d.complete(f, page.logged(receiver_send(page)))
    d.apply(warning.model_copy(update={"severity": "critical", "alert_id": "esc"}), (0, 1))
    clock.advance(60)
    (g,) = d.due()
    esc = d.plan(g).notification  # planned while the log holds the page's handle
    assert esc is not None and esc.send
    return page, esc


def test_an_update_of_a_deleted_page_is_posted_as_a_new_message() -> None:
    with FakeSlack() as fake:
        cfg = SlackReceiverConfig(type="slack", token_env=TOKEN_ENV, channel="#alerts", base_url=fake.api_base_url)
        loop = asyncio.new_event_loop()
        receiver = SlackReceiver("slack", cfg, "http://dash", {TOKEN_ENV: fake.token})
        try:
            _, update = _escalation(Clock(), lambda n: loop.run_until_complete(receiver.send(n)))
            assert update.update and update.message_ref["ts"]
            fake.delete(update.message_ref["ts"])  # someone deleted the page
            handle = loop.run_until_complete(receiver.send(update))
        finally:
            loop.run_until_complete(receiver.close())
            loop.close()
        messages: list[Message] = fake.snapshot()
    (new,) = messages
    assert handle == {"channel": "#alerts", "ts": new.ts} and new.ts != update.message_ref["ts"]
    assert new.thread_ts is None and new.header.startswith("[CRITICAL]")
    assert fake.edits == []


def test_an_incoming_webhook_cannot_edit_so_the_update_is_a_new_message() -> None:
    with FakeSlack() as fake:
        cfg = SlackReceiverConfig(type="slack", webhook_url_env=WEBHOOK_ENV)
        loop = asyncio.new_event_loop()
        receiver = SlackReceiver("slack", cfg, "http://dash", {WEBHOOK_ENV: fake.webhook_url()})
        try:

            def send(n: Notification) -> Any:
                return loop.run_until_complete(receiver.send(n))

            # no handle from the page: the escalation is planned as a new message
            _, update = _escalation(Clock(), send)
            assert not update.update and update.message_ref == {}
            assert send(update) is None
            # ...and one marked as an update (a handle from a bot token, then the config
            # changed to a webhook) is posted as a new message all the same
            assert send(replace(update, update=True, message_ref={"channel": "#alerts", "ts": "1.0"})) is None
        finally:
            loop.run_until_complete(receiver.close())
            loop.close()
        messages = fake.snapshot()
    assert [m.header.split(" ")[0] for m in messages] == ["[WARNING]", "[CRITICAL]", "[CRITICAL]"]
    assert all(m.kind == "webhook" for m in messages)


def test_the_log_receiver_logs_an_update_as_one_of_the_incidents_page(caplog: pytest.LogCaptureFixture) -> None:
    receiver = LogReceiver("log", "http://dash")
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.INFO, logger="llmpulse.notify"):
            page, update = _escalation(Clock(), lambda n: loop.run_until_complete(receiver.send(n)))
            assert update.update and update.message_ref == {"notification_id": page.notification_id}
            handle = loop.run_until_complete(receiver.send(update))
    finally:
        loop.close()
    assert handle == {"notification_id": page.notification_id}
    first, second = (r.getMessage() for r in caplog.records if r.name == "llmpulse.notify")
    assert first.startswith(f"notification {page.notification_id}: [WARNING]")
    assert second.startswith(
        f"notification {update.notification_id} (update of {page.notification_id}:"
        " escalated to critical: error_rate on model=gpt-4o): [CRITICAL]"
    )
