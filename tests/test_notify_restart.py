"""`llmpulse notify` killed with SIGKILL during a burst and restarted: every notification once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import yaml

from llmpulse.config import Settings
from tests.fake_slack import FakeSlack, Message
from tests.test_notify import WEBHOOK_ENV, make_alert, publish

ROOT = Path(__file__).resolve().parent.parent


def start_notifier(config: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmpulse", "--config", str(config), "notify"],
        cwd=ROOT,
        env=env,
        stdout=out,
        stderr=out,
    )
    deadline = time.monotonic() + 90
    while "notifier started" not in log.read_text(errors="replace").split("--- restart ---")[-1]:
        assert proc.poll() is None, f"notify exited early:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"notify did not start:\n{log.read_text()}"
        time.sleep(0.1)
    return proc


def rule_of(m: Message) -> str:
    return m.header.split("rule=")[1]


def test_sigkill_during_a_burst_and_restart_notifies_each_thing_once(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(**{"kafka.session_timeout_ms": 2000})
    config = tmp_path / "llmpulse.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "data"),
                "kafka": {
                    "url": settings.kafka.url,
                    "topic_prefix": settings.kafka.topic_prefix,
                    "session_timeout_ms": 2000,
                },
                "notify": {
                    "receivers": {"slack": {"type": "slack", "webhook_url_env": WEBHOOK_ENV}},
                    "default_receivers": ["slack"],
                    "group_by": ["rule"],
                    "group_wait_s": 2.0,
                    "group_interval_s": 1.0,
                    "retry_initial_s": 0.2,
                    # never commit while running: the restart replays the whole topic and
                    # only the delivery log stands between it and duplicates
                    "commit_interval_s": 3600,
                },
            }
        )
    )
    log = tmp_path / "notify.log"
    with FakeSlack() as fake:
        env = {**os.environ, WEBHOOK_ENV: fake.webhook_url(), "PYTHONUNBUFFERED": "1"}
        env = {k: v for k, v in env.items() if k != "LLMPULSE_CONFIG"}
        proc = start_notifier(config, env, log)
        try:
            burst_a = [make_alert(rule=f"a{i}", dims={"model": f"m{j}"}) for i in range(8) for j in range(5)]
            publish(settings, burst_a)
            fake.wait_count(8)
            # burst B: new groups that wait in group_wait when the notifier is killed
            burst_b = [make_alert(rule=f"b{i}", dims={"model": f"m{j}"}) for i in range(8) for j in range(5)]
            publish(settings, burst_b)
            time.sleep(0.5)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            assert len(fake.snapshot()) == 8, "B was sent before the kill: the test lost its point"
            # while it is down: resolutions and one more alert for earlier groups
            publish(
                settings,
                [
                    *[
                        a.model_copy(update={"state": "resolved", "alert_id": f"res-{a.rule}"})
                        for a in burst_a
                        if a.rule in ("a0", "a1", "a2", "a3") and a.dimensions["model"] == "m0"
                    ],
                    make_alert(rule="a4", dims={"model": "m5"}),
                ],
            )
            with open(log, "a") as f:
                f.write("\n--- restart ---\n")
            proc = start_notifier(config, env, log)
            fake.wait_count(8 + 8 + 4 + 1, timeout=90)
            publish(settings, [make_alert(rule="zz-control")])
            messages = fake.wait_count(8 + 8 + 4 + 1 + 1, timeout=60)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    by_rule = Counter(rule_of(m) for m in messages)
    expected = Counter({f"a{i}": 1 for i in range(8)} | {f"b{i}": 1 for i in range(8)})
    expected.update({"a0": 1, "a1": 1, "a2": 1, "a3": 1, "a4": 1, "zz-control": 1})
    assert by_rule == expected, f"{by_rule} != {expected}\n{log.read_text()[-3000:]}"
    assert len({m.notification_id for m in messages}) == len(messages)
    for m in messages[8:]:
        if rule_of(m) in ("a0", "a1", "a2", "a3"):
            assert "4 firing · 1 resolved" in m.header
        elif rule_of(m) == "a4":
            assert "6 firing" in m.header and "(new)" in m.body_text
    for m in messages:
        if rule_of(m).startswith("b"):
            assert "5 firing" in m.header
