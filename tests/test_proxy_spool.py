"""Broker down: the proxy keeps serving, spools, replays exactly once when the broker is back."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import openai
import yaml

from llmpulse.config import Settings
from llmpulse.embedded.broker import EmbeddedBroker, broker_binary
from llmpulse.kafka.clients import producer_settings
from llmpulse.kafka.topics import ensure_topics
from llmpulse.producers.mock_upstream import start_mock_upstream
from llmpulse.producers.proxy.batching import KeyedBatcher
from llmpulse.producers.spool import SPOOL_FILE, SpoolFile, SpoolingPublisher, events_in
from tests.kafkatools import read_messages
from tests.mock_servers import LoopThread, Servers, call_events, upstream_settings


def _tansu_on(port: int) -> subprocess.Popen[bytes]:
    """The same broker binary and arguments as EmbeddedBroker, on a port just left by one.

    (EmbeddedBroker.start refuses a port with connections in TIME_WAIT: its free-port
    check binds without SO_REUSEADDR; Tansu itself binds fine.)
    """
    url = f"tcp://127.0.0.1:{port}"
    return subprocess.Popen(
        [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )


def test_broker_down_requests_succeed_and_spooled_events_arrive_once(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    own = EmbeddedBroker(0, log_dir=tmp_path / "own-broker").start()
    restarted: subprocess.Popen[bytes] | None = None
    try:
        settings_holder: list[Settings] = []

        def settings_for(url: str) -> Settings:
            st = make_settings(
                **upstream_settings(url),
                **{"kafka.url": f"kafka://{own.bootstrap}", "proxy.delivery_timeout_s": 3, "proxy.broker_retry_s": 0.5},
            )
            ensure_topics(own.bootstrap, st.kafka)
            settings_holder.append(st)
            return st

        with Servers(settings_for) as s:
            topic = s.settings.kafka.topic("calls")
            client = openai.OpenAI(base_url=s.base_url, api_key="sk-x", max_retries=0)
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "up"}], user="before")  # type: ignore[list-item]
            assert len(read_messages(own.bootstrap, topic, expect=1, timeout=30)) == 1
            own.stop()
            started = time.monotonic()
            for i in range(20):
                r = client.chat.completions.with_raw_response.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "down"}], user=f"down-{i}"  # type: ignore[list-item]
                )
                assert r.status_code == 200
            assert time.monotonic() - started < 10  # monitoring did not slow the requests down
            pub = s.proxy.publisher
            deadline = time.monotonic() + 30
            while getattr(pub, "spool_pending_bytes", 0) == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert getattr(pub, "spool_pending_bytes", 0) > 0, "nothing spooled"
            assert getattr(pub, "broker_up", True) is False
            restarted = _tansu_on(own.port)  # same port, empty (Tansu keeps memory only)
            ensure_topics(own.bootstrap, s.settings.kafka)
            msgs = read_messages(
                own.bootstrap, topic, until=lambda ms: len(call_events(ms)) >= 20, timeout=90, quiet_s=3.0
            )
            events = call_events(msgs)
            assert getattr(pub, "spool_pending_bytes", -1) == 0
    finally:
        own.stop()
        if restarted is not None:
            restarted.terminate()
            restarted.wait(10)
    down = [e for e in events if (e.user or "").startswith("down-")]
    assert sorted(e.user or "" for e in down) == sorted(f"down-{i}" for i in range(20))
    assert len({e.event_id for e in events}) == len(events)  # exactly once
    assert all(e.status_code == 200 and e.completion_tokens == 16 for e in down)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_spool_limit_drops_and_counts_and_a_restart_replays(
    broker: EmbeddedBroker, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings()
    topic = settings.kafka.topic("calls")
    spool_dir = tmp_path / "spool"
    dead = producer_settings(f"127.0.0.1:{_closed_port()}", settings.kafka)
    pub = SpoolingPublisher(dead, spool_dir, spool_max_bytes=2000, delivery_timeout_s=1, retry_s=0.2)
    try:
        for i in range(40):
            assert pub.publish_raw(topic, b'{"n":%d,"pad":"%s"}' % (i, b"x" * 60), "k") is True
        deadline = time.monotonic() + 20
        while pub.stats.spooled + pub.stats.dropped < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        pub.close(timeout=1)
    assert pub.stats.delivered == 0
    assert pub.stats.spooled > 0 and pub.stats.dropped > 0
    assert pub.stats.spooled + pub.stats.dropped == 40
    assert (spool_dir / SPOOL_FILE).stat().st_size <= 2000
    # a torn record at the end (crash mid-write) is cut off, the rest survives
    with open(spool_dir / SPOOL_FILE, "ab") as f:
        f.write(b"\x01\x02\x03")
    sf = SpoolFile(spool_dir)
    assert sf.pending == (spool_dir / SPOOL_FILE).stat().st_size
    sf.close()
    # a new publisher (a restarted proxy) replays the spool to a reachable broker
    live = SpoolingPublisher(producer_settings(broker.bootstrap, settings.kafka), spool_dir)
    try:
        assert live.flush(30)
    finally:
        live.close()
    msgs = read_messages(broker.bootstrap, topic, expect=pub.stats.spooled, timeout=60, quiet_s=1.0)
    values = [m.value() for m in msgs]
    assert len(values) == pub.stats.spooled == len(set(values))


def _proxy_process(config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """`llmpulse proxy` as a process of its own, ready (healthz answers)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMPULSE_")}
    with open(log, "ab") as fh:
        p = subprocess.Popen([sys.executable, "-m", "llmpulse", "--config", str(config), "proxy", "--port", str(port)],
                             stdout=fh, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return p
        except OSError:
            pass
        assert p.poll() is None, f"the proxy exited: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, "the proxy did not start"
        time.sleep(0.2)


def test_proxy_sigkilled_with_events_in_its_batch_buffer_loses_none(
    broker: EmbeddedBroker, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """Every call the proxy answered reaches Kafka although the proxy was SIGKILLed while the
    events waited in its batch buffer (batch_linger_ms 5 s): the next proxy on the same data
    dir replays them from the in-flight log, each once."""
    settings = make_settings()
    topic = settings.kafka.topic("calls")
    lt = LoopThread()
    mock = lt.run(start_mock_upstream())
    port = _closed_port()
    config = tmp_path / "proxy.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"),
        "kafka": {"url": settings.kafka.url, "topic_prefix": settings.kafka.topic_prefix},
        "proxy": {"batch_linger_ms": 5000, "batch_max_events": 200,
                  "upstreams": [{"name": "mock", "base_url": mock.base_url}]},
    }))  # fmt: skip
    inflight = tmp_path / "data" / "spool" / "proxy" / "inflight"
    log = tmp_path / "proxy.log"
    users = {f"killed-{i}" for i in range(20)}
    proc = _proxy_process(config, port, log)
    second: subprocess.Popen[bytes] | None = None
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-x", max_retries=0)
        started = time.monotonic()
        for i in range(20):
            msgs = [{"role": "user", "content": "hi"}]
            if i % 4 == 3:  # streamed calls are recorded after their last byte
                with client.chat.completions.create(model="gpt-4o", messages=msgs, user=f"killed-{i}",  # type: ignore[arg-type]
                                                    stream=True) as stream:  # fmt: skip
                    assert [c for c in stream]
            else:
                r = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=msgs, user=f"killed-{i}")  # type: ignore[arg-type]
                assert r.status_code == 200
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # all of them were still in the batch buffer (the linger is 5 s, the batch limit 200)
        assert time.monotonic() - started < 5.0, "too slow to kill the proxy within the batch linger"
        second = _proxy_process(config, port, log)
        events = [e for e in call_events(read_messages(
            broker.bootstrap, topic, until=lambda ms: users <= {e.user for e in call_events(ms)}, timeout=60, quiet_s=2.0,
        )) if e.user in users]  # fmt: skip
        assert {e.user for e in events} == users, f"lost: {sorted(users - {e.user for e in events})}"
        assert len(events) == len({e.event_id for e in events}) == 20, "replayed more than once"
        # calls answered by the second proxy are logged too, and settled once delivered: a clean
        # stop (which publishes the batch buffer) leaves no in-flight records for a later start
        later = {f"later-{i}" for i in range(5)}
        for u in sorted(later):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], user=u)  # type: ignore[list-item]
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
        assert not list(inflight.glob("*.bin")), "records left unsettled after a clean stop"
        after = [e for e in call_events(read_messages(
            broker.bootstrap, topic, until=lambda ms: later <= {e.user for e in call_events(ms)}, timeout=60, quiet_s=2.0,
        )) if e.user in later]  # fmt: skip
        assert sorted(e.user or "" for e in after) == sorted(later)
    finally:
        for p in (proc, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
        lt.run(mock.stop())
        lt.close()


def test_events_logged_when_accepted_are_settled_once_when_spooled_or_dropped(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """Broker unreachable, spool too small for all: every accepted event ends up either in the
    spool or counted as dropped, once, and a clean close leaves nothing in the in-flight log
    (which a later start would replay a second time)."""
    settings = make_settings()
    topic = settings.kafka.topic("calls")
    spool_dir = tmp_path / "spool"
    dead = producer_settings(f"127.0.0.1:{_closed_port()}", settings.kafka)
    pub = SpoolingPublisher(dead, spool_dir, spool_max_bytes=2000, delivery_timeout_s=1, retry_s=0.2)

    async def accept() -> KeyedBatcher:
        b = KeyedBatcher(pub, topic, max_events=4, linger_s=10)
        for i in range(40):
            b.add("gpt-4o", b'{"n":%d,"pad":"%s"}' % (i, b"x" * 60))
        assert b.buffered == 0  # 40 events, 4 a batch: every batch went out when full
        return b

    try:
        batcher = asyncio.run(accept())
        batcher.close()
        deadline = time.monotonic() + 20
        while pub.stats.spooled + pub.stats.dropped // 4 < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        pub.close(timeout=1)
    assert not list((spool_dir / "inflight").glob("*.bin")), "settled records left in the in-flight log"
    sf = SpoolFile(spool_dir)
    spooled = sum(events_in(v) for _, (_, _, v) in sf.read(1000))
    sf.close()
    assert pub.stats.delivered == 0 and spooled > 0 and pub.stats.dropped > 0
    assert spooled + pub.stats.dropped == 40
