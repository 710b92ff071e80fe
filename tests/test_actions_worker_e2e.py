"""The whole loop: an abusive key's traffic through the real proxy -> Kafka -> the real worker fires
the per-key rule -> the action engine -> the proxy answers that key 429 while others pass."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from llmpulse.config import Settings
from llmpulse.embedded.broker import EmbeddedBroker
from tests.mock_servers import Servers, upstream_settings
from tests.pipeline import Component, write_config
from tests.test_actions_e2e import ABUSER, NICE, chat, engine_running

RULES = """
version: 1
rules:
  - name: key_rate
    type: threshold
    kind: calls
    metric: requests
    direction: above
    warning: 15
    critical: 1000
    window: 2
    by: [api_key_hash]
    min_requests: 0
"""


@pytest.mark.e2e
def test_abusive_traffic_fires_the_per_key_rule_and_the_proxy_refuses_that_key(
    broker: EmbeddedBroker, make_settings: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMPULSE_SECRET_KEY_HASH", "actions-e2e-secret")
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(RULES)
    actions = [{"name": "throttle", "match": {"rule": "key_rate"}, "action": "rate_limit",
                "scope": "api_key_hash", "requests_per_minute": 1, "duration": "2m"}]  # fmt: skip
    with Servers(lambda url: make_settings(**upstream_settings(url), **{"actions.rules": actions})) as s:
        config = write_config(tmp_path / "llmpulse.yaml", s.settings, rules_file=str(rules_file), worker__grace_s=1.0)
        worker = Component(config, "worker", log=tmp_path / "worker.log").start()
        try:
            with engine_running(s.settings, broker.bootstrap):
                deadline = time.monotonic() + 120
                refused = False
                while time.monotonic() < deadline and not refused:
                    statuses = [chat(s.base_url, ABUSER) for _ in range(10)]
                    refused = 429 in statuses
                    assert chat(s.base_url, NICE) == 200  # other keys always pass
                    time.sleep(0.2)
                assert refused, worker.output()[-2000:]
                assert [chat(s.base_url, NICE) for _ in range(3)] == [200, 200, 200]
                assert chat(s.base_url, ABUSER) == 429
        finally:
            worker.stop()
