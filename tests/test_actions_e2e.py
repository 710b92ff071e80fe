"""Actions end to end: alerts on the real broker -> the action engine -> the real proxy enforcing them."""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import openai
import pytest

from llmpulse.actions.engine import ActionEngine
from llmpulse.actions.model import action_id_of
from llmpulse.cli import main as cli_main
from llmpulse.config import Settings
from llmpulse.embedded.broker import EmbeddedBroker
from llmpulse.producers.keyhash import KeyHasher, load_secret
from llmpulse.producers.mock_upstream import MockOptions, start_mock_upstream
from llmpulse.producers.proxy import ProxyServer, start_proxy
from llmpulse.schemas import ActionEvent, Alert, alert_fingerprint, encode
from llmpulse.schemas.base import utc_now
from llmpulse.schemas.codec import decode
from tests.kafkatools import produce, read_messages
from tests.mock_servers import LoopThread, Servers, call_events, upstream_settings
from tests.pipeline import write_config

ABUSER = "sk-abuser-0123456789abcdefghij"
NICE = "sk-nice-0123456789abcdefghijkl"
MESSAGES = [{"role": "user", "content": "hello"}]


def wait_for(pred: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@contextlib.contextmanager
def engine_running(settings: Settings, bootstrap: str) -> Iterator[ActionEngine]:
    engine = ActionEngine(settings, bootstrap).start()
    t = threading.Thread(target=engine.run, daemon=True)
    t.start()
    try:
        yield engine
    finally:
        engine.stop()
        t.join(15)


def alert(rule: str, dims: dict[str, str], metric: str = "requests") -> Alert:
    now = utc_now()
    return Alert(
        fingerprint=alert_fingerprint(rule, dims), rule=rule, severity="warning", state="firing", metric=metric,
        value=500.0, threshold=100.0, dimensions=dims, window_start=now - timedelta(seconds=60), window_end=now,
        started_at=now - timedelta(seconds=60), summary=f"{rule} breached",
    )  # fmt: skip


def publish(bootstrap: str, settings: Settings, *alerts: Alert) -> None:
    produce(bootstrap, settings.kafka.topic("alerts"), [(a.fingerprint, encode(a)) for a in alerts])


def chat(base_url: str, key: str, model: str = "gpt-4o-mini") -> int:
    """One call through the proxy; the HTTP status (429/403 as the OpenAI client raises them)."""
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
    try:
        client.chat.completions.create(model=model, messages=MESSAGES)  # type: ignore[arg-type]
        return 200
    except openai.APIStatusError as exc:
        return exc.status_code


def cli(config: Path, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli_main(["--config", str(config), "actions", *argv])
    return rc, out.getvalue()


def test_abusive_key_is_rate_limited_by_every_proxy_then_lifted(
    broker: EmbeddedBroker, make_settings: Callable[..., Settings]
) -> None:
    rules = [{"name": "throttle", "match": {"rule": "key_rate"}, "action": "rate_limit", "scope": "api_key_hash",
              "requests_per_minute": 2, "duration": "10s"}]  # fmt: skip
    with Servers(lambda url: make_settings(**upstream_settings(url), **{"actions.rules": rules})) as s:
        settings = s.settings
        second: ProxyServer = s.lt.run(start_proxy(settings, port=0))
        abuser = KeyHasher(load_secret(settings.data_dir)).hash(ABUSER)
        try:
            assert [chat(s.base_url, ABUSER) for _ in range(3)] == [200, 200, 200]  # nothing active yet
            with engine_running(settings, broker.bootstrap) as engine:
                a = alert("key_rate", {"api_key_hash": abuser})
                publish(broker.bootstrap, settings, a)
                aid = action_id_of("throttle", a)
                wait_for(lambda: s.proxy.actions.snapshot.any and second.actions.snapshot.any, "both proxies to apply")
                applied = engine.store.get(aid)
                assert applied is not None and applied.status == "applied" and applied.actor == "llmpulse"

                # the OpenAI client sees a 429 with Retry-After; other keys pass
                client = openai.OpenAI(base_url=s.base_url, api_key=ABUSER, max_retries=0)
                for _ in range(2):
                    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
                with pytest.raises(openai.RateLimitError) as err:
                    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
                retry_after = int(err.value.response.headers["retry-after"])
                assert 1 <= retry_after <= 31
                assert err.value.response.headers["x-ratelimit-limit-requests"] == "2"
                assert [chat(s.base_url, NICE) for _ in range(4)] == [200] * 4
                # the second instance enforces the same action
                assert [chat(second.base_url, ABUSER) for _ in range(3)] == [200, 200, 429]
                # a restarted proxy picks the state up from the topic
                s.lt.run(second.stop())
                second = s.lt.run(start_proxy(settings, port=0))
                wait_for(lambda: second.actions.snapshot.any, "the restarted proxy to apply")
                assert [chat(second.base_url, ABUSER) for _ in range(3)] == [200, 200, 429]
                assert chat(second.base_url, NICE) == 200

                # the limit lifts after its duration: the engine records the expiry, the proxies let it pass
                done = wait_for(
                    lambda: (ev := engine.store.get(aid)) is not None and ev.status == "expired" and ev,
                    "the action to expire", timeout=30,
                )
                assert done.reason == "duration over"
                wait_for(lambda: not s.proxy.actions.snapshot.any, "the proxy to drop the limit")
                assert [chat(s.base_url, ABUSER) for _ in range(4)] == [200] * 4
        finally:
            s.lt.run(second.stop())

        # the refused calls are recorded with the action's error type
        msgs = read_messages(
            broker.bootstrap, settings.kafka.topic("calls"),
            until=lambda m: sum(1 for e in call_events(m) if e.error_type == "action_rate_limited") >= 3, timeout=60,
        )  # fmt: skip
        refused = [e for e in call_events(msgs) if e.error_type == "action_rate_limited"]
        assert len(refused) >= 3 and all(e.status_code == 429 and e.api_key_hash == abuser for e in refused)

        # every step of the action is its own message on the actions topic (key action_id:status)
        steps = read_messages(broker.bootstrap, settings.kafka.topic("actions"), until=lambda m: len(
            [x for x in m if x.value() is not None]) >= 3, timeout=30)  # fmt: skip
        got = {m.key().decode(): decode(m.value(), ActionEvent).valid[0] for m in steps if m.value() is not None}
        assert set(got) == {f"{aid}:proposed", f"{aid}:applied", f"{aid}:expired"}
        assert all(k == ev.event_id for k, ev in got.items())


def test_approval_gates_the_action_reject_and_expiry(
    broker: EmbeddedBroker, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    rules = [{"name": "throttle", "match": {"rule": "key_rate"}, "action": "rate_limit", "scope": "api_key_hash",
              "requests_per_minute": 1, "duration": "5m", "approve": True, "approval_timeout": "6s"}]  # fmt: skip
    keys = [f"sk-key-{i}-0123456789abcdefghij" for i in range(3)]
    with Servers(lambda url: make_settings(**upstream_settings(url), **{"actions.rules": rules})) as s:
        settings = s.settings
        config = write_config(tmp_path / "llmpulse.yaml", settings, actions__rules=rules, proxy__upstreams=[
            {"name": "mock", "base_url": s.mock.base_url}])  # fmt: skip
        hashes = [KeyHasher(load_secret(settings.data_dir)).hash(k) for k in keys]
        alerts = [alert("key_rate", {"api_key_hash": h}) for h in hashes]
        ids = [action_id_of("throttle", a) for a in alerts]
        with engine_running(settings, broker.bootstrap) as engine:
            publish(broker.bootstrap, settings, *alerts)
            wait_for(lambda: len(engine.store.pending()) == 3, "three pending actions")
            rc, out = cli(config, "list")
            assert rc == 0 and all(i in out for i in ids) and out.count("pending") == 3
            # pending: nothing changes
            assert [chat(s.base_url, k) for k in keys for _ in range(2)] == [200] * 6
            assert not s.proxy.actions.snapshot.any

            rc, out = cli(config, "approve", ids[0], "--by", "alice")
            assert rc == 0 and "applied by alice" in out
            wait_for(lambda: s.proxy.actions.snapshot.any, "the approved limit in the proxy")
            assert [chat(s.base_url, keys[0]) for _ in range(2)] == [200, 429]

            rc, out = cli(config, "reject", ids[1][:8], "--by", "bob", "--reason", "false alarm")
            assert rc == 0 and "rejected by bob" in out
            assert cli(config, "approve", ids[1])[0] == 1  # a rejected action cannot be approved

            expired = wait_for(
                lambda: (ev := engine.store.get(ids[2])) is not None and ev.status == "expired" and ev,
                "the unapproved action to expire", timeout=30,
            )
            assert expired.reason == "not approved in time"
            assert cli(config, "approve", ids[2])[0] == 1
            # the rejected and the expired actions never applied
            assert [chat(s.base_url, k) for k in keys[1:] for _ in range(3)] == [200] * 6
            first = engine.store.get(ids[0])
            assert first is not None and first.status == "applied" and first.actor == "alice"

            rc, out = cli(config, "undo", ids[0], "--by", "carol")
            assert rc == 0 and "undone by carol" in out
            wait_for(lambda: not s.proxy.actions.snapshot.any, "the undone limit to lift")
            assert chat(s.base_url, keys[0]) == 200
            rc, out = cli(config, "list", "--all", "--json")
            states = {json.loads(line)["action_id"]: json.loads(line)["status"] for line in out.splitlines()}
            assert states == {ids[0]: "undone", ids[1]: "rejected", ids[2]: "expired"}

        steps = read_messages(broker.bootstrap, settings.kafka.topic("actions"), until=lambda m: len(
            [x for x in m if x.value() is not None]) >= 11, timeout=30)  # fmt: skip
        got = [decode(m.value(), ActionEvent).valid[0] for m in steps if m.value() is not None]
        first_steps = {e.status: e.actor for e in got if e.action_id == ids[0]}
        assert first_steps == {"proposed": "llmpulse", "pending": "llmpulse", "approved": "alice",
                               "applied": "alice", "undone": "carol"}  # fmt: skip
        assert {e.status for e in got if e.action_id == ids[1]} == {"proposed", "pending", "rejected"}
        assert {e.status for e in got if e.action_id == ids[2]} == {"proposed", "pending", "expired"}


def test_fallback_routes_a_failing_model_and_records_both_models(
    broker: EmbeddedBroker, make_settings: Callable[..., Settings]
) -> None:
    lt = LoopThread()
    bad = lt.run(start_mock_upstream(options=MockOptions(error_rate=1.0, error_status=500)))
    good = lt.run(start_mock_upstream())
    rules = [
        {"name": "gpt4o_fallback", "match": {"rule": "success_rate", "dimensions": {"model": "gpt-4o"}},
         "action": "fallback", "fallback_model": "llama-3-8b", "duration": "5m"},
        {"name": "cut_backup", "match": {"rule": "backup_down"}, "action": "open_circuit", "upstream": "backup"},
    ]  # fmt: skip
    settings = make_settings(**{
        "proxy.upstreams": [
            {"name": "flaky", "base_url": bad.base_url, "models": ["gpt-4o*"], "retries": 0},
            {"name": "backup", "base_url": good.base_url, "models": ["llama*"]},
        ],
        "actions.rules": rules,
    })  # fmt: skip
    proxy: ProxyServer = lt.run(start_proxy(settings, port=0))
    try:
        assert chat(proxy.base_url, NICE, "gpt-4o") == 500
        with engine_running(settings, broker.bootstrap) as engine:
            publish(broker.bootstrap, settings, alert("success_rate", {"model": "gpt-4o"}, "success_rate"))
            wait_for(lambda: proxy.actions.snapshot.routes, "the fallback route in the proxy")
            client = openai.OpenAI(base_url=proxy.base_url, api_key=NICE, max_retries=0)
            r = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
            assert r.model == "llama-3-8b"
            chunks: list[Any] = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))  # type: ignore[arg-type]
            assert chunks and all(c.model == "llama-3-8b" for c in chunks)
            assert good.stats.requests == 2 and good.stats.last_body["model"] == "llama-3-8b"
            assert bad.stats.requests == 1  # only the call before the action
            assert chat(proxy.base_url, NICE, "gpt-4o-mini") == 500  # other models keep their route

            # open the circuit of the backup upstream: the proxy answers 503 itself
            publish(broker.bootstrap, settings, alert("backup_down", {"provider": "openai"}))
            wait_for(lambda: proxy.actions.snapshot.cuts, "the open circuit in the proxy")
            assert chat(proxy.base_url, NICE, "llama-3-8b") == 503
            assert good.stats.requests == 2
            assert len(engine.store.active()) == 2
        msgs = read_messages(
            broker.bootstrap, settings.kafka.topic("calls"), until=lambda m: len(call_events(m)) >= 5, timeout=60
        )
        events = call_events(msgs)
        assert len(events) == 5
        routed = [e for e in events if e.model == "gpt-4o" and e.status_code == 200]
        assert len(routed) == 2 and all(e.response_model == "llama-3-8b" for e in routed)
        assert {e.streamed for e in routed} == {True, False}
        cut = [e for e in events if e.error_type == "action_circuit_open"]
        assert len(cut) == 1 and cut[0].status_code == 503 and cut[0].model == "llama-3-8b"
    finally:
        lt.run(proxy.stop())
        lt.run(bad.stop())
        lt.run(good.stop())
        lt.close()
