"""The SDK without a broker, at exit, configured from the environment, and on the light install."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import llmpulse
from llmpulse.config import Settings
from llmpulse.schemas import CallEvent, decode
from llmpulse.sdk import background
from llmpulse.sdk.settings import load_sdk_settings
from tests.kafkatools import read_messages


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_py(code: str, env: dict[str, str], timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LLMPULSE_")}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**base, **env},
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def test_missing_broker_never_raises_and_never_blocks(make_settings: Callable[..., Settings], tmp_path: object) -> None:
    settings = make_settings(**{
        "kafka.url": f"kafka://127.0.0.1:{closed_port()}",
        "sdk.queue_size": 100,
        "sdk.exit_flush_timeout_s": 0.5,
    })
    rt = llmpulse.configure(settings)
    slowest = 0.0
    for i in range(2000):
        t0 = time.perf_counter()
        ev = llmpulse.record(model="gpt-4o-mini", prompt_tokens=i, completion_tokens=1, user=f"u{i % 7}")
        slowest = max(slowest, time.perf_counter() - t0)
        assert ev is not None
    assert slowest < 0.25, f"record() blocked for {slowest:.3f} s"
    pub = rt.publisher
    assert pub is not None
    t0 = time.monotonic()
    assert pub.close() is False  # nothing could be delivered
    assert time.monotonic() - t0 < 0.5 + 1.0, "close() waits at most its bound"
    s = pub.stats
    # every event is delivered or counted as dropped: none vanishes (here: nothing delivered)
    assert s.delivered == 0 and s.dropped == 2000
    background.configure(make_settings())  # leave a working runtime for other tests


def test_process_exit_is_bounded_without_broker() -> None:
    proc, took = run_py(
        """
        import llmpulse
        for i in range(500):
            llmpulse.record(model="gpt-4o", prompt_tokens=10, completion_tokens=2)
        print("done")
        """,
        {"LLMPULSE_KAFKA": f"127.0.0.1:{closed_port()}", "LLMPULSE_SDK__EXIT_FLUSH_TIMEOUT_S": "1", "LLMPULSE_APP": "x"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done" and "Traceback" not in proc.stderr
    assert took < 1 + 8, f"exit took {took:.1f} s"


def test_env_only_config_and_flush_at_exit(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    bootstrap = settings.kafka.bootstrap_servers()
    proc, _ = run_py(
        """
        import llmpulse
        for i in range(5):
            llmpulse.record(model="gpt-4o-mini", prompt_tokens=100, completion_tokens=10, user=f"exit-{i}")
        """,  # exits at once: only the atexit flush delivers these
        {"LLMPULSE_KAFKA": bootstrap, "LLMPULSE_APP": "exit-app",
         "LLMPULSE_TOPIC_PREFIX": settings.kafka.topic_prefix, "LLMPULSE_SDK__FLUSH_INTERVAL_S": "30"},
    )
    assert proc.returncode == 0, proc.stderr
    msgs = read_messages(bootstrap, settings.kafka.topic("calls"),
                         until=lambda ms: sum(len(decode(m.value(), CallEvent).valid) for m in ms) >= 5, timeout=60)
    events = [e for m in msgs for e in decode(m.value(), CallEvent).valid]
    assert sorted(e.user or "" for e in events) == [f"exit-{i}" for i in range(5)]
    assert {e.app for e in events} == {"exit-app"} and all(e.cost_usd for e in events)


def test_settings_from_environment() -> None:
    s = load_sdk_settings(
        {"LLMPULSE_KAFKA": "broker-1:9092,broker-2:9092", "LLMPULSE_APP": "billing",
         "LLMPULSE_TOPIC_PREFIX": "acme.", "LLMPULSE_SDK__QUEUE_SIZE": "50"}
    )
    assert s.kafka.bootstrap_servers() == "broker-1:9092,broker-2:9092"
    assert (s.sdk.app, s.kafka.topic("calls"), s.sdk.queue_size) == ("billing", "acme.calls", 50)
    assert load_sdk_settings({"LLMPULSE_KAFKA": "kafka://h:1"}).kafka.bootstrap_servers() == "h:1"


def test_light_install_imports() -> None:
    proc, _ = run_py(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"faust", "aiohttp", "msgspec", "prometheus_client", "clickhouse_connect", "chdb"}:
                    raise ImportError(f"{name} is not in the light install")
                return None
        sys.meta_path.insert(0, Block())
        import llmpulse
        assert "pydantic" not in sys.modules and "confluent_kafka" not in sys.modules, "import llmpulse stays cheap"
        ev = llmpulse.record(model="gpt-4o", prompt_tokens=1000, completion_tokens=100)
        assert ev is not None and ev.cost_usd > 0, ev
        import openai
        c = llmpulse.instrument(openai.OpenAI(api_key="sk-x", base_url="http://127.0.0.1:9/v1"))
        print("ok", round(ev.cost_usd, 6))
        """,
        {"LLMPULSE_SDK__ENABLED": "false"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok 0.0035"
