"""The broker dies or stalls with events in flight: every event a publisher accepted reaches Kafka.

The embedded broker (Tansu) keeps answering its open connections for about 5 s after
SIGTERM, acknowledging produce requests, then exits with everything in memory. Events
published in that window were counted as delivered and lost (measured: spool 0 bytes,
no drop counted). Each test publishes through the real component (the proxy with the
mock upstream; the SDK; HTTP ingest) to a real broker of its own, stops or stalls it, restarts it on
the same port, and requires every event accepted after the fault in Kafka afterwards,
once per call (counted by `event_id`; duplicate messages are allowed: at least once).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

import llmpulse
from llmpulse.config import Settings
from llmpulse.embedded.broker import EmbeddedBroker
from llmpulse.kafka.clients import producer_settings
from llmpulse.kafka.topics import ensure_topics
from llmpulse.producers.ingest import start_ingest_thread
from llmpulse.producers.spool import SpoolingPublisher
from llmpulse.schemas import CallEvent, decode
from llmpulse.sdk import background
from tests.kafkatools import read_messages
from tests.mock_servers import Servers, upstream_settings
from tests.test_proxy_spool import _tansu_on

DELIVERY_TIMEOUT_S = 8.0  # above Tansu's ~5 s of answering after SIGTERM


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    b = EmbeddedBroker(0, log_dir=tmp_path / "own-broker").start()
    try:
        yield b
    finally:
        if b.process is not None and b.process.poll() is None:
            os.kill(b.process.pid, signal.SIGCONT)
        b.stop()


def _events(bootstrap: str, topic: str, users: set[str], timeout: float = 90) -> list[CallEvent]:
    """The call events of `topic` once every one of `users` is there (or `timeout`)."""

    def of(msgs: list[object]) -> list[CallEvent]:
        return [e for m in msgs for e in decode(m.value(), CallEvent).valid]  # type: ignore[attr-defined]

    msgs = read_messages(bootstrap, topic, until=lambda ms: users <= {e.user for e in of(ms)}, timeout=timeout, quiet_s=2.0)
    return [e for e in of(msgs) if e.user in users]


def _assert_each_once(events: list[CallEvent], users: set[str]) -> None:
    got = {e.user for e in events}
    assert got == users, f"{len(users - got)} accepted events missing from Kafka: {sorted(users - got)[:10]}"
    ids = {e.event_id for e in events}
    assert len(ids) == len(users), "one event per call (a resend repeats the same event_id)"


def _restart(broker: EmbeddedBroker, settings: Settings) -> subprocess.Popen[bytes]:
    """The broker again on its port, empty, with the topics created up front (DESIGN: a
    consumer that subscribes before its topic exists gets no assignment)."""
    proc = _tansu_on(broker.port)
    deadline = time.monotonic() + 30
    while True:
        try:
            ensure_topics(broker.bootstrap, settings.kafka)
            return proc
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _sigterm_and_wait_exit(broker: EmbeddedBroker, during: Callable[[int], None], calls: int, every_s: float) -> None:
    """SIGTERM the broker, call `during(i)` every `every_s` while it shuts down and after."""
    assert broker.process is not None
    proc = broker.process
    proc.send_signal(signal.SIGTERM)
    for i in range(calls):
        during(i)
        time.sleep(every_s)
    proc.wait(30)


def test_proxy_broker_sigterm_and_restart_loses_no_accepted_event(
    make_settings: Callable[..., Settings], own_broker: EmbeddedBroker
) -> None:
    restarted: subprocess.Popen[bytes] | None = None

    def settings_for(url: str) -> Settings:
        return make_settings(**upstream_settings(url), **{
            "kafka.url": f"kafka://{own_broker.bootstrap}",
            "proxy.delivery_timeout_s": DELIVERY_TIMEOUT_S, "proxy.broker_retry_s": 0.5,
        })  # fmt: skip

    try:
        with Servers(settings_for) as s:
            ensure_topics(own_broker.bootstrap, s.settings.kafka)
            topic = s.settings.kafka.topic("calls")
            client = openai.OpenAI(base_url=s.base_url, api_key="sk-x", max_retries=0)

            def call(user: str) -> None:
                r = client.chat.completions.with_raw_response.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "hi"}], user=user  # type: ignore[list-item]
                )
                assert r.status_code == 200  # accepted: the proxy owes Kafka this event

            for i in range(3):
                call(f"before-{i}")
            _events(own_broker.bootstrap, topic, {f"before-{i}" for i in range(3)})
            # calls while the broker shuts down (it still acknowledges) and after it is gone
            _sigterm_and_wait_exit(own_broker, lambda i: call(f"down-{i}"), calls=30, every_s=0.3)
            pub = s.proxy.publisher
            assert isinstance(pub, SpoolingPublisher)
            deadline = time.monotonic() + 3 * DELIVERY_TIMEOUT_S
            while pub.broker_up and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(DELIVERY_TIMEOUT_S + 1)  # down past the delivery timeout: librdkafka gives up
            restarted = _restart(own_broker, s.settings)
            for i in range(3):
                call(f"after-{i}")
            users = {f"down-{i}" for i in range(30)} | {f"after-{i}" for i in range(3)}
            events = _events(own_broker.bootstrap, topic, users)
            stats = pub.stats
    finally:
        if restarted is not None:
            restarted.terminate()
            restarted.wait(10)
    _assert_each_once(events, users)
    assert stats.dropped == 0
    assert stats.resent > 0, "the broker acknowledged events after SIGTERM: they must have been sent again"


def test_proxy_broker_stalled_past_the_delivery_timeout_loses_no_accepted_event(
    make_settings: Callable[..., Settings], own_broker: EmbeddedBroker
) -> None:
    def settings_for(url: str) -> Settings:
        return make_settings(**upstream_settings(url), **{
            "kafka.url": f"kafka://{own_broker.bootstrap}",
            "proxy.delivery_timeout_s": 4, "proxy.broker_retry_s": 0.5,
        })  # fmt: skip

    assert own_broker.process is not None
    pid = own_broker.process.pid
    with Servers(settings_for) as s:
        ensure_topics(own_broker.bootstrap, s.settings.kafka)
        topic = s.settings.kafka.topic("calls")
        client = openai.OpenAI(base_url=s.base_url, api_key="sk-x", max_retries=0)

        def call(user: str) -> None:
            r = client.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}], user=user  # type: ignore[list-item]
            )
            assert r.status_code == 200

        for i in range(3):
            call(f"before-{i}")
        os.kill(pid, signal.SIGSTOP)
        try:
            stalled_at = time.monotonic()
            for i in range(20):
                call(f"stalled-{i}")
                time.sleep(0.25)
            pub = s.proxy.publisher
            assert isinstance(pub, SpoolingPublisher)
            while pub.stats.spooled == 0 and time.monotonic() - stalled_at < 30:
                time.sleep(0.1)
            assert pub.stats.spooled > 0, "nothing timed out into the spool during the stall"
            time.sleep(2)
        finally:
            os.kill(pid, signal.SIGCONT)
        for i in range(3):
            call(f"after-{i}")
        users = {f"before-{i}" for i in range(3)} | {f"stalled-{i}" for i in range(20)} | {f"after-{i}" for i in range(3)}
        events = _events(own_broker.bootstrap, topic, users)
    _assert_each_once(events, users)
    assert pub.stats.dropped == 0


def test_sdk_broker_sigterm_and_restart_loses_no_accepted_event(
    make_settings: Callable[..., Settings], own_broker: EmbeddedBroker
) -> None:
    settings = make_settings(**{
        "kafka.url": f"kafka://{own_broker.bootstrap}", "sdk.delivery_timeout_s": DELIVERY_TIMEOUT_S,
        "sdk.broker_retry_s": 0.5, "sdk.flush_interval_s": 0.05,
    })  # fmt: skip
    ensure_topics(own_broker.bootstrap, settings.kafka)
    topic = settings.kafka.topic("calls")
    restarted: subprocess.Popen[bytes] | None = None
    rt = llmpulse.configure(settings)
    pub = rt.publisher
    assert pub is not None
    try:

        def record(user: str) -> None:
            assert llmpulse.record(model="gpt-4o-mini", prompt_tokens=10, completion_tokens=2, user=user) is not None

        for i in range(3):
            record(f"before-{i}")
        assert pub.flush(30)
        _sigterm_and_wait_exit(own_broker, lambda i: record(f"down-{i}"), calls=30, every_s=0.3)
        time.sleep(DELIVERY_TIMEOUT_S + 2)
        restarted = _restart(own_broker, settings)
        for i in range(3):
            record(f"after-{i}")
        users = {f"down-{i}" for i in range(30)} | {f"after-{i}" for i in range(3)}
        events = _events(own_broker.bootstrap, topic, users)
        stats = pub.stats
    finally:
        background.configure(make_settings())  # leave a working runtime for other tests
        if restarted is not None:
            restarted.terminate()
            restarted.wait(10)
    _assert_each_once(events, users)
    assert stats.dropped == 0


def test_ingest_broker_sigterm_and_restart_loses_no_acknowledged_event(
    make_settings: Callable[..., Settings], own_broker: EmbeddedBroker
) -> None:
    """202 means Kafka acknowledged: those events must be there after the broker's restart
    (a 503 is not an acceptance: the sender retries it)."""
    settings = make_settings(**{"kafka.url": f"kafka://{own_broker.bootstrap}", "ingest.delivery_timeout_s": 3})
    ensure_topics(own_broker.bootstrap, settings.kafka)
    topic = settings.kafka.topic("calls")
    server = start_ingest_thread(settings, port=0, token="")
    restarted: subprocess.Popen[bytes] | None = None
    accepted: set[str] = set()

    def post(user: str) -> None:
        body = json.dumps({"event_id": f"ing-{user}", "model": "gpt-4o", "user": user, "latency_ms": 5}).encode()
        req = urllib.request.Request(server.url + "/ingest/calls", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                if resp.status == 202:
                    accepted.add(user)
        except urllib.error.HTTPError as exc:
            assert exc.code == 503, exc.read()

    try:
        post("before-0")
        _sigterm_and_wait_exit(own_broker, lambda i: post(f"down-{i}"), calls=20, every_s=0.3)
        time.sleep(4)
        restarted = _restart(own_broker, settings)
        post("after-0")
        during = {u for u in accepted if u != "before-0"}
        assert any(u.startswith("down-") for u in during), "no call was acknowledged while the broker stopped"
        events = _events(own_broker.bootstrap, topic, during)
    finally:
        server.stop()
        if restarted is not None:
            restarted.terminate()
            restarted.wait(10)
    _assert_each_once(events, during)


PUBLISHER_SCRIPT = """
import sys, time
from pathlib import Path
from llmpulse.kafka.clients import producer_settings
from llmpulse.config import load_settings
from llmpulse.producers.spool import SpoolingPublisher
bootstrap, topic, spool = sys.argv[1:4]
settings = load_settings(None, environ={}, overrides={"kafka.url": "kafka://" + bootstrap})
pub = SpoolingPublisher(producer_settings(bootstrap, settings.kafka), Path(spool), delivery_timeout_s=60)
for i in range(20):
    pub.publish_raw(topic, b'{"n":%d}' % i, "k")
while pub._queue or len(pub._producer) < 20:
    time.sleep(0.01)
print("queued", flush=True)
time.sleep(600)
"""


def test_publisher_killed_with_messages_in_librdkafka_loses_none(
    make_settings: Callable[..., Settings], own_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """SIGKILL of the publishing process while the broker does not answer (stalled): the
    messages lived only in librdkafka's memory; the next process replays them."""
    settings = make_settings(**{"kafka.url": f"kafka://{own_broker.bootstrap}"})
    ensure_topics(own_broker.bootstrap, settings.kafka)
    topic = settings.kafka.topic("calls")
    spool = tmp_path / "spool"
    assert own_broker.process is not None
    os.kill(own_broker.process.pid, signal.SIGSTOP)
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER_SCRIPT, own_broker.bootstrap, topic, str(spool)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"queued"
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.kill(own_broker.process.pid, signal.SIGCONT)
    pub = SpoolingPublisher(producer_settings(own_broker.bootstrap, settings.kafka), spool)
    try:
        assert pub.flush(60)
    finally:
        pub.close()
    msgs = read_messages(own_broker.bootstrap, topic, expect=20, timeout=60, quiet_s=2.0)
    assert sorted({m.value() for m in msgs}) == sorted(b'{"n":%d}' % i for i in range(20))


def test_sample_publisher_counts_undelivered_events_as_dropped(make_settings: Callable[..., Settings]) -> None:
    """EventPublisher (GPU and host samples) has no spool: what times out is dropped, counted in events."""
    from prometheus_client import REGISTRY

    from llmpulse.producers.publisher import EventPublisher
    from llmpulse.schemas import GpuSample
    from tests.test_proxy_spool import _closed_port

    settings = make_settings()
    metric = ("llmpulse_publish_dropped_total", {"component": "outage-test"})
    before = REGISTRY.get_sample_value(*metric) or 0.0
    dead = producer_settings(f"127.0.0.1:{_closed_port()}", settings.kafka, **{"message.timeout.ms": 1000})
    pub = EventPublisher(dead, component="outage-test")
    samples = [GpuSample(host="h", gpu_index=i, utilization_gpu_pct=50.0) for i in range(4)]
    assert pub.publish_batch(settings.kafka.topic("gpu"), samples, key="h")
    assert pub.publish(settings.kafka.topic("gpu"), samples[0], key="h")
    deadline = time.monotonic() + 30
    while pub.stats.dropped < 5 and time.monotonic() < deadline:
        pub.poll(0.1)
    assert (pub.stats.delivered, pub.stats.failed, pub.stats.dropped) == (0, 2, 5)
    assert (REGISTRY.get_sample_value(*metric) or 0.0) - before == 5
