"""The notifier against the real broker and a local Slack that speaks Slack's protocols."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from llmpulse.config import Settings
from llmpulse.schemas import Alert, DeadLetter, alert_fingerprint, decode_one, encode
from llmpulse.sinks.notifier import Notifier, verify_signature
from llmpulse.sinks.notifier.silences import add_silence, expire_silence
from tests.fake_slack import FakeSlack
from tests.kafkatools import produce, read_messages

WEBHOOK_ENV = "LLMPULSE_SECRET_SLACK_WEBHOOK_URL"
TOKEN_ENV = "LLMPULSE_SECRET_SLACK_BOT_TOKEN"
T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)

FAST = {
    "kafka.session_timeout_ms": 2000,
    "notify.group_wait_s": 0.8,
    "notify.group_interval_s": 1.0,
    "notify.retry_initial_s": 0.2,
    "notify.retry_max_s": 1.0,
    "notify.commit_interval_s": 0.2,
    "notify.group_by": ["rule"],  # these tests group by rule; the default (incident): test_notify_incident.py
}


def make_alert(
    rule: str = "error_rate",
    dims: dict[str, str] | None = None,
    severity: str = "warning",
    state: str = "firing",
    value: float = 0.2,
    started_at: datetime = T0,
) -> Alert:
    dims = {"model": "gpt-4o"} if dims is None else dims
    return Alert(
        fingerprint=alert_fingerprint(rule, dims),
        rule=rule,
        severity=severity,  # type: ignore[arg-type]
        state=state,  # type: ignore[arg-type]
        metric="error_rate",
        value=value,
        threshold=0.05,
        dimensions=dims,
        window_start=started_at,
        window_end=started_at + timedelta(minutes=1),
        started_at=started_at,
        summary=f"{rule} {state}",
    )


def publish(settings: Settings, alerts: Sequence[Alert | bytes]) -> None:
    bootstrap = settings.kafka.bootstrap_servers()
    values: list[tuple[bytes | str | None, bytes]] = []
    for a in alerts:
        if isinstance(a, bytes):
            values.append((b"garbage", a))
        else:
            values.append((a.fingerprint, encode(a)))
    produce(bootstrap, settings.kafka.topic("alerts"), values)


@contextmanager
def running(settings: Settings, environ: dict[str, str]) -> Iterator[Notifier]:
    notifier = Notifier(settings, bootstrap=settings.kafka.bootstrap_servers(), environ=environ)
    errors: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(notifier.run())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not notifier.started.wait(0.1):
        assert not errors, errors
        assert time.monotonic() < deadline, "notifier did not start"
    try:
        yield notifier
    finally:
        notifier.stop()
        thread.join(30)
        assert not thread.is_alive(), "notifier did not stop"
    assert not errors, errors


def slack_webhook_settings(make_settings: Callable[..., Settings], fake: FakeSlack, **extra: Any) -> tuple[Settings, dict[str, str]]:
    overrides: dict[str, Any] = {
        **FAST,
        "notify.receivers": {"slack": {"type": "slack", "webhook_url_env": WEBHOOK_ENV}},
        "notify.default_receivers": ["slack"],
        "notify.dashboard_url": "http://dash.example:8080/",
    }
    settings = make_settings(**{**overrides, **extra})
    return settings, {WEBHOOK_ENV: fake.webhook_url()}


@pytest.fixture
def fake() -> Iterator[FakeSlack]:
    with FakeSlack() as f:
        yield f


def test_burst_of_50_within_group_wait_is_one_digest(make_settings: Callable[..., Settings], fake: FakeSlack) -> None:
    settings, env = slack_webhook_settings(make_settings, fake, **{"notify.group_wait_s": 2.0})
    burst = [make_alert(dims={"model": f"m{i:02d}"}) for i in range(50)]
    with running(settings, env):
        publish(settings, burst)
        (digest,) = fake.wait_count(1)
        # a later alert of another group: its message comes after, and nothing else did
        publish(settings, [make_alert(rule="latency_avg")])
        messages = fake.wait_count(2)
    assert len(messages) == 2
    assert "50 firing" in digest.header and "rule=error_rate" in digest.header
    assert digest.body_text.count("error_rate") >= 40 and "...and 10 more alerts" in digest.body_text
    assert "latency_avg" in messages[1].header


def test_firing_then_resolved_is_two_messages_and_bad_input_is_dead_lettered(
    make_settings: Callable[..., Settings], fake: FakeSlack
) -> None:
    settings, env = slack_webhook_settings(make_settings, fake)
    firing = make_alert(severity="critical", value=0.31)
    with running(settings, env):
        publish(settings, [b'{"not": "an alert"}', firing])
        fake.wait_count(1)
        publish(settings, [firing.model_copy(update={"state": "resolved", "alert_id": "r1"})])
        fake.wait_count(2)
        publish(settings, [make_alert(rule="control")])
        messages = fake.wait_count(3)
    assert [m.header.split(" ")[0] for m in messages] == ["[CRITICAL]", "[RESOLVED]", "[WARNING]"]
    first = messages[0]
    # what crossed what, window, since when, and the dashboard link filtered to the alert
    assert "error_rate *0.31* vs threshold 0.05" in first.body_text
    assert "window 12:00:00-12:01:00 UTC" in first.body_text
    assert "since 2025-06-01 12:00:00 UTC" in first.body_text
    assert (
        "http://dash.example:8080/?alert=error_rate%7Cmodel%3Dgpt-4o"
        "&from=2025-06-01T12%3A00%3A00Z&to=2025-06-01T12%3A01%3A00Z&model=gpt-4o"
    ) in first.body_text
    assert "1 resolved" in messages[1].header
    dead = read_messages(settings.kafka.bootstrap_servers(), settings.kafka.topic("deadletter"), expect=1)
    letter = decode_one(dead[0].value(), DeadLetter)
    assert letter.reason.startswith("invalid alert:") and "required field is missing" in letter.reason
    assert letter.original_bytes() == b'{"not": "an alert"}'


def test_silenced_alert_is_not_sent_until_the_silence_expires(
    make_settings: Callable[..., Settings], fake: FakeSlack
) -> None:
    settings, env = slack_webhook_settings(make_settings, fake)
    bootstrap = settings.kafka.bootstrap_servers()
    silence = add_silence(
        settings, duration=timedelta(hours=1), rule="error_*", dimensions={"model": "gpt-4o"}, bootstrap=bootstrap
    )
    with running(settings, env):
        publish(settings, [make_alert(), make_alert(dims={"model": "claude"})])
        (first,) = fake.wait_count(1)
        assert "model=claude" in first.body_text and "gpt-4o" not in first.body_text
        publish(settings, [make_alert(rule="control", dims={"model": "x"})])
        fake.wait_count(2)
        assert all("gpt-4o" not in m.body_text for m in fake.snapshot())
        expire_silence(settings, silence.silence_id, bootstrap=bootstrap)
        messages = fake.wait_count(3)
    assert "model=gpt-4o" in messages[2].body_text and "2 firing" in messages[2].header
    assert "(new)" in messages[2].body_text


def test_inhibition_critical_mutes_the_warning_of_the_same_fingerprint(
    make_settings: Callable[..., Settings], fake: FakeSlack
) -> None:
    warn_path, crit_path = "/services/T/WARN/x", "/services/T/CRIT/y"
    settings = make_settings(
        **FAST,
        **{
            "notify.receivers": {
                "warn": {"type": "slack", "webhook_url_env": "WARN_URL"},
                "crit": {"type": "slack", "webhook_url_env": "CRIT_URL"},
            },
            "notify.routes": [
                {"name": "critical", "severity": ["critical"], "receivers": ["crit"]},
                {"name": "warning", "severity": ["warning"], "receivers": ["warn"]},
            ],
        },
    )
    env = {"WARN_URL": fake.webhook_url(warn_path), "CRIT_URL": fake.webhook_url(crit_path)}
    a = make_alert(dims={"model": "a"})
    b = make_alert(dims={"model": "b"})
    with running(settings, env):
        # the same fingerprint as warning and critical within group_wait: the critical alone
        publish(settings, [b, b.model_copy(update={"severity": "critical", "alert_id": "b2"})])
        # a warning that is then escalated
        publish(settings, [a])
        fake.wait_count(1, path=warn_path)
        fake.wait_count(1, path=crit_path)
        publish(settings, [a.model_copy(update={"severity": "critical", "alert_id": "a2"})])
        fake.wait_count(2, path=crit_path)
        # de-escalation inside the incident stays muted; the resolution reaches both channels
        publish(settings, [a.model_copy(update={"alert_id": "a3"})])
        publish(settings, [a.model_copy(update={"state": "resolved", "severity": "critical", "alert_id": "a4"})])
        fake.wait_count(3, path=crit_path)
        fake.wait_count(2, path=warn_path)
        publish(settings, [make_alert(rule="control", severity="critical")])
        fake.wait_count(4, path=crit_path)
    warn, crit = fake.snapshot(warn_path), fake.snapshot(crit_path)
    assert len(warn) == 2 and len(crit) == 4
    assert "model=a" in warn[0].body_text and "model=b" not in warn[0].body_text
    assert warn[1].header.startswith("[RESOLVED]") and "model=a" in warn[1].body_text
    assert "model=b" in crit[0].body_text and "CRITICAL" in crit[0].body_text
    assert "model=a" in crit[1].body_text and "CRITICAL" in crit[1].body_text
    assert "1 firing · 1 resolved" in crit[2].header  # b still firing, a resolved
    assert "control" in crit[3].header


def test_429_retry_after_then_500s_delivers_each_notification_once(
    make_settings: Callable[..., Settings], fake: FakeSlack
) -> None:
    settings = make_settings(
        **FAST,
        **{
            "notify.receivers": {
                "slack": {"type": "slack", "token_env": TOKEN_ENV, "channel": "#alerts", "base_url": fake.api_base_url}
            },
            "notify.default_receivers": ["slack"],
        },
    )
    fake.fail_next(429, retry_after=2)
    fake.fail_next(500, times=3)
    rules = ["r1", "r2", "r3"]
    with running(settings, {TOKEN_ENV: fake.token}):
        publish(settings, [make_alert(rule=r) for r in rules])
        messages = fake.wait_count(3)
        publish(settings, [make_alert(rule="control")])
        messages = fake.wait_count(4)
    assert sorted(m.header.split("rule=")[1] for m in messages) == sorted([*rules, "control"])
    ids = [m.notification_id for m in messages]
    assert len(set(ids)) == 4 and None not in ids
    limited = next(a for a in fake.attempts if a.status == 429)
    later = [a for a in fake.attempts if a.at > limited.at + 0.2]
    assert later, "no attempt after the 429"
    assert all(a.at >= limited.at + 2.0 for a in later), "an attempt came before Retry-After"
    retried = [a for a in fake.attempts if a.notification_id == limited.notification_id]
    assert retried[0].status == 429 and retried[-1].status == 200
    assert retried[1].at - limited.at >= 2.0
    assert sum(a.status == 500 for a in fake.attempts) == 3


class SigningServer:
    """A webhook endpoint that records what it got; `status` is what it answers."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self._cond = threading.Condition()
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                return

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with srv._cond:
                    srv.requests.append(({k: v for k, v in self.headers.items()}, body))
                    srv._cond.notify_all()
                self.send_response(srv.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def wait(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.requests) < n:
                assert time.monotonic() < deadline, f"webhook got {len(self.requests)} of {n}"
                self._cond.wait(0.5)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_webhook_signature_verifies_and_a_down_receiver_blocks_no_one(
    make_settings: Callable[..., Settings], fake: FakeSlack
) -> None:
    good, down = SigningServer(200), SigningServer(503)
    secret = "s3cret-shared"
    try:
        settings = make_settings(
            **FAST,
            **{
                "notify.receivers": {
                    "hook": {"type": "webhook", "url": good.url, "secret_env": "HOOK_SECRET"},
                    "down": {"type": "webhook", "url": down.url},
                    "slack": {"type": "slack", "webhook_url_env": WEBHOOK_ENV},
                    "log": {"type": "log"},
                },
                "notify.default_receivers": ["down", "hook", "slack", "log"],
            },
        )
        env = {"HOOK_SECRET": secret, WEBHOOK_ENV: fake.webhook_url()}
        with running(settings, env):
            publish(settings, [make_alert(severity="critical")])
            fake.wait_count(1, timeout=30)
            good.wait(1)
            down.wait(3)  # still retrying while the others were delivered
            publish(settings, [make_alert(rule="second")])
            fake.wait_count(2, timeout=30)
            good.wait(2)
    finally:
        good.close()
        down.close()
    headers, body = good.requests[0]
    ts, sig = headers["X-LLMPulse-Timestamp"], headers["X-LLMPulse-Signature"]
    assert verify_signature(secret, body, ts, sig)
    expected = "sha256=" + hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(sig, expected)
    assert not verify_signature("wrong-secret", body, ts, sig)
    assert not verify_signature(secret, body + b" ", ts, sig)
    payload = json.loads(body)
    assert payload["status"] == "firing" and payload["severity"] == "critical"
    assert payload["firing"][0]["rule"] == "error_rate"
    assert payload["firing"][0]["dashboard_url"].startswith("http://127.0.0.1:8080/?alert=")
    assert headers["X-LLMPulse-Notification-Id"] == payload["notification_id"]
    assert "X-LLMPulse-Signature" not in down.requests[0][0]


def test_a_second_notifier_replaying_the_topic_sends_nothing_twice(
    make_settings: Callable[..., Settings], fake: FakeSlack
) -> None:
    settings, env = slack_webhook_settings(make_settings, fake)
    alerts = [make_alert(rule=f"rule{i}", dims={"model": f"m{j}"}) for i in range(3) for j in range(4)]
    resolved = alerts[0].model_copy(update={"state": "resolved", "alert_id": "res0"})
    with running(settings, env):
        publish(settings, alerts)
        fake.wait_count(3)
        publish(settings, [resolved])
        fake.wait_count(4)
    # another consumer group reads the alerts topic from its start: the delivery log
    # says all of it was notified already
    other = settings.model_copy(
        update={"notify": settings.notify.model_copy(update={"consumer_group": "replay-from-start"})}
    )
    with running(other, env):
        publish(settings, [make_alert(rule="control")])
        messages = fake.wait_count(5)

    assert len(messages) == 5 and "control" in messages[4].header
    assert "control" in messages[4].header
    ids = [m.notification_id for m in messages]
    assert len(set(ids)) == 5
