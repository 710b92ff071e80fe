"""Actions without Kafka: config, matching, the step machine, hooks, rate buckets, root causes."""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from typing import Any

import pytest
from aiohttp import web

from llmpulse.actions.hints import approval_lines
from llmpulse.actions.hooks import run_hook
from llmpulse.actions.model import action_id_of, matches, propose, step
from llmpulse.actions.state import ActionStore
from llmpulse.config import ConfigError, load_settings
from llmpulse.config.actions import ActionsConfig, HookConfig
from llmpulse.producers.proxy.enforce import Bucket, build
from llmpulse.schemas import Alert, alert_fingerprint
from llmpulse.schemas.base import utc_now
from llmpulse.schemas.codec import encode
from llmpulse.streams.rules.rootcause import explain_window
from tests.mock_servers import LoopThread
from tests.rules_helpers import Runner, calls, engine


def _alert(rule: str = "key_rate", dims: dict[str, str] | None = None, **kw: Any) -> Alert:
    d = dims if dims is not None else {"api_key_hash": "abc123"}
    now = utc_now()
    fields: dict[str, Any] = {
        "fingerprint": alert_fingerprint(rule, d), "rule": rule, "severity": "warning", "state": "firing",
        "metric": "requests", "value": 500.0, "threshold": 100.0, "dimensions": d,
        "window_start": now - timedelta(seconds=60), "window_end": now, "started_at": now - timedelta(seconds=60),
    }  # fmt: skip
    fields.update(kw)
    return Alert(**fields)


def _cfg(*rules: dict[str, Any], **top: Any) -> ActionsConfig:
    return ActionsConfig.model_validate({"rules": list(rules), **top})


def test_config_validates_and_reads_durations() -> None:
    cfg = _cfg(
        {"name": "lim", "action": "rate_limit", "requests_per_minute": 10, "duration": "15m"},
        {"name": "fb", "action": "fallback", "fallback_model": "small", "approve": True, "approval_timeout": "1h30m"},
        {"name": "h", "action": "hook", "hook": {"command": ["true"], "timeout": "5s"}},
        approval_timeout="2h",
    )
    assert [r.duration for r in cfg.rules] == [900.0, 900.0, 900.0]
    assert cfg.rules[1].approval_timeout == 5400.0 and cfg.approval_timeout == 7200.0
    assert cfg.rules[2].hook is not None and cfg.rules[2].hook.timeout == 5.0
    bad = [
        ({"name": "x", "action": "rate_limit"}, "requests_per_minute"),
        ({"name": "x", "action": "fallback"}, "fallback_model"),
        ({"name": "x", "action": "hook"}, "hook"),
        ({"name": "x", "action": "block", "duration": "soon"}, "invalid duration"),
        ({"name": "x", "action": "explode"}, "action"),
    ]
    for rule, words in bad:
        with pytest.raises(ConfigError, match=words):
            load_settings(None, environ={}, overrides={"actions.rules": [rule]})
    with pytest.raises(ValueError, match="exactly one"):
        HookConfig(url="http://x.example", command=["true"])
    with pytest.raises(ValueError, match="unique"):
        _cfg({"name": "a", "action": "block"}, {"name": "a", "action": "block"})


def test_matching_targets_and_ids() -> None:
    cfg = _cfg(
        {"name": "lim", "match": {"rule": "key_*", "severity": ["critical"]}, "action": "rate_limit",
         "requests_per_minute": 5},
        {"name": "fb", "match": {"rule": "success_rate", "dimensions": {"model": "gpt-4*"}},
         "action": "fallback", "fallback_model": "small"},
    )  # fmt: skip
    lim, fb = cfg.rules
    warn, crit = _alert(), _alert(severity="critical")
    assert not matches(lim, warn) and matches(lim, crit)
    sr = _alert("success_rate", {"model": "gpt-4o"}, metric="success_rate")
    assert matches(fb, sr) and not matches(fb, _alert("success_rate", {"model": "llama"}))
    ev = propose(lim, crit)
    assert ev is not None and ev.target == {"api_key_hash": "abc123"} and ev.params["requests_per_minute"] == 5
    again = crit.model_copy(update={"alert_id": "another", "ts": crit.ts + timedelta(seconds=60)})
    assert ev.action_id == action_id_of("lim", crit) == action_id_of("lim", again)  # same incident
    # a global alert names its target only through its root cause
    glob = _alert("success_rate", {}, metric="error_rate")
    assert propose(fb, glob) is None
    caused = glob.model_copy(update={"root_cause": {"dimension": "model", "value": "gpt-4o", "share": 0.8}})
    fb_ev = propose(fb, caused)
    assert fb_ev is not None and fb_ev.target == {"model": "gpt-4o"}
    # a new incident (another started_at) is another action
    later = crit.model_copy(update={"started_at": crit.started_at + timedelta(minutes=5)})
    assert action_id_of("lim", later) != ev.action_id


def test_state_is_the_step_of_highest_rank_whatever_the_order() -> None:
    cfg = _cfg({"name": "lim", "action": "rate_limit", "requests_per_minute": 5, "approve": True})
    p = propose(cfg.rules[0], _alert())
    assert p is not None
    pending = step(p, "pending")
    approved = step(pending, "approved", actor="alice")
    applied = step(approved, "applied", actor="alice")
    store = ActionStore()
    for ev in (applied, p, approved, pending):  # out of order, as from several partitions
        store.apply(ev.event_id, encode(ev))
    store.apply("barrier|x", None)
    store.apply("junk", b"{not json")
    got = store.get(p.action_id)
    assert got is not None and got.status == "applied" and got.actor == "alice"
    assert [a.action_id for a in store.active()] == [p.action_id]
    assert {e.event_id for e in (p, pending, approved, applied)} == {
        f"{p.action_id}:{s}" for s in ("proposed", "pending", "approved", "applied")
    }


def test_approval_lines_name_the_command() -> None:
    cfg = _cfg({"name": "lim", "action": "rate_limit", "requests_per_minute": 5, "approve": True})
    a = _alert()
    [line] = approval_lines(a, cfg)
    assert f"llmpulse actions approve {action_id_of('lim', a)}" in line and "pending approval" in line
    assert approval_lines(a.model_copy(update={"state": "resolved"}), cfg) == []
    assert approval_lines(a, _cfg({"name": "lim", "action": "block"})) == []


def test_command_hook_gets_the_alert_on_stdin_and_times_out() -> None:
    payload = {"rule": "key_rate", "value": 5}
    echo = HookConfig(command=[sys.executable, "-c", "import sys, json; print(json.load(sys.stdin)['rule'])"])
    r = run_hook(echo, payload)
    assert r.ok and r.detail == {"exit_code": 0, "output": "key_rate\n"}
    failing = run_hook(HookConfig(command=[sys.executable, "-c", "import sys; sys.exit(3)"]), payload)
    assert not failing.ok and failing.detail["exit_code"] == 3
    slow = run_hook(HookConfig(command=[sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.5), payload)
    assert not slow.ok and "timed out" in slow.detail["error"]
    missing = run_hook(HookConfig(command=["/nonexistent/hook"]), payload)
    assert not missing.ok and "cannot run" in missing.detail["error"]


def test_http_hook_posts_the_alert() -> None:
    got: list[Any] = []

    async def handler(request: web.Request) -> web.Response:
        got.append((await request.json(), request.headers.get("X-Token")))
        status = 500 if got[-1][0].get("fail") else 200
        return web.Response(status=status, text="ok")

    lt = LoopThread()

    async def start() -> web.AppRunner:
        app = web.Application()
        app.router.add_post("/hook", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    runner = lt.run(start())
    try:
        port = runner.addresses[0][1]
        hook = HookConfig(url=f"http://127.0.0.1:{port}/hook", headers={"X-Token": "t"}, timeout=5)
        r = run_hook(hook, {"rule": "r"})
        assert r.ok and r.detail["http_status"] == 200 and got[0] == ({"rule": "r"}, "t")
        bad = run_hook(hook, {"fail": True})
        assert not bad.ok and bad.detail["http_status"] == 500
        down = run_hook(HookConfig(url="http://127.0.0.1:9/hook", timeout=2), {})
        assert not down.ok and "error" in down.detail
    finally:
        lt.run(runner.cleanup())
        lt.close()


def test_bucket_and_snapshot() -> None:
    b = Bucket(60)  # one a second
    now = b.t
    assert all(b.take(1, now) == 0 for _ in range(60))
    assert b.take(1, now) == pytest.approx(1.0)
    assert b.take(1, now + 1.0) == 0
    t = Bucket(600)
    t.charge(900)  # a big call goes into debt: 300 tokens = 30 s at 10/s
    assert t.wait(t.t) == pytest.approx(30.1, abs=0.2)
    cfg = _cfg({"name": "lim", "action": "rate_limit", "requests_per_minute": 2, "scope": "user"})
    ev = propose(cfg.rules[0], _alert(dims={"user": "bob"}))
    assert ev is not None
    applied = step(ev, "applied", expires_at=utc_now() + timedelta(minutes=1))
    snap, kept = build([applied])
    assert snap.any and list(snap.limits["user"]) == ["bob"]
    assert snap.refusal((None, "bob", "app"))[0] is None
    assert snap.refusal((None, "bob", "app"))[0] is None
    refused, _ = snap.refusal((None, "bob", "app"))
    assert refused is not None and refused.status == 429 and int(refused.headers["Retry-After"]) >= 1
    assert snap.refusal(("k", "alice", "app"))[0] is None
    # a rebuild keeps the bucket (still empty); an expired action is not enforced
    snap2, _ = build([applied], kept)
    assert snap2.refusal((None, "bob", "app"))[0] is not None
    gone = step(ev, "applied", expires_at=utc_now() - timedelta(seconds=1))
    snap3, _ = build([gone])
    assert snap3.refusal((None, "bob", "app"))[0] is None


def test_root_cause_of_a_global_error_rate_alert_names_the_model() -> None:
    """The worker's adaptor with real aggregates of every dimension set of one window."""
    window = [
        calls(0, 1000, 90),
        calls(0, 100, 80, dims={"model": "gpt-4o"}),
        calls(0, 500, 5, dims={"model": "llama"}),
        calls(0, 400, 5, dims={"model": "mistral"}),
        calls(0, 1000, 90, dims={"provider": "openai"}),
        calls(0, 600, 50, dims={"app": "chat"}),
        calls(0, 400, 40, dims={"app": "search"}),
        calls(0, 300, 27, dims={"api_key_hash": "k1"}),
        calls(0, 700, 63, dims={"api_key_hash": "k2"}),
    ]
    r = Runner(engine("rules:\n  - {name: errors_global, metric: error_rate, warning: 0.05}\n"))
    alerts = [a for agg in window for a in r.feed(agg)]
    assert len(alerts) == 1 and alerts[0].dimensions == {}
    other = _alert()  # an alert of another window: unchanged
    [explained, same] = explain_window(window, [alerts[0], other])
    assert explained.root_cause is not None
    assert (explained.root_cause["dimension"], explained.root_cause["value"]) == ("model", "gpt-4o")
    assert explained.root_cause["share"] == pytest.approx(80 / 90, abs=1e-3)
    assert "mostly model=gpt-4o" in explained.summary and same == other
    # a fallback action rule on the global alert targets the model it names
    fb = _cfg({"name": "fb", "action": "fallback", "fallback_model": "llama"}).rules[0]
    ev = propose(fb, explained)
    assert ev is not None and ev.target == {"model": "gpt-4o"}
    assert json.loads(encode(explained))["root_cause"]["value"] == "gpt-4o"


def test_slack_text_says_an_action_awaits_approval() -> None:
    from llmpulse.actions.hints import configure_hints
    from llmpulse.sinks.notifier.blocks import alert_text

    a = _alert()
    assert "approve" not in alert_text(a, "http://dash", utc_now())
    configure_hints(_cfg({"name": "lim", "action": "rate_limit", "requests_per_minute": 5, "approve": True}))
    try:
        text = alert_text(a, "http://dash", utc_now())
    finally:
        configure_hints(None)
    assert f"`llmpulse actions approve {action_id_of('lim', a)}`" in text and "pending approval" in text
