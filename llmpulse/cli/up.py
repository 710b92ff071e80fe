"""`llmpulse up`: the whole pipeline on one machine with the embedded defaults."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from llmpulse.cli import settings_of

# Stopped in this order on Ctrl-C: producers first, then the worker (it publishes its open
# windows), then the sink (it drains the topics and flushes), the notifier, the broker last.
STOP_ORDER = ["loadgen", "gpu", "proxy", "ingest", "mock-upstream", "worker", "sink", "actions", "notify", "dashboard"]


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "up",
        help="run the whole pipeline on the embedded defaults (Ctrl-C stops it cleanly)",
        description="Start the embedded Kafka broker, the stream worker, the ClickHouse sink, the "
        "notifier and the dashboard. --demo adds a mock upstream model server, the proxy, a "
        "simulated GPU and traffic with injected incidents.",
    )
    p.add_argument("--demo", action="store_true", help="add the mock upstream, proxy, simulated GPU and demo traffic")
    p.add_argument("--for", dest="duration", type=float, default=None, metavar="SECONDS", help="stop after this many seconds")
    p.add_argument("--demo-scale", type=float, default=1.0, metavar="F", help="shorten the demo's incident schedule by F (0.1: about a minute)")
    p.add_argument("--demo-rate", type=float, default=8.0, metavar="N", help="demo calls per second at the daily peak")
    p.set_defaults(handler=run)


def _available_commands() -> set[str]:
    from llmpulse.cli import build_parser

    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def run(args: argparse.Namespace) -> int:
    from llmpulse.embedded.broker import EmbeddedBroker
    from llmpulse.embedded.ports import free_port
    from llmpulse.embedded.runtime_file import update_runtime
    from llmpulse.errors import LLMPulseError
    from llmpulse.kafka.topics import ensure_topics

    settings = settings_of(args)
    if not settings.kafka.embedded:
        raise LLMPulseError("`up` runs the embedded broker; with an external Kafka start each component on its own")
    data_dir = settings.data_dir
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    commands = _available_commands()
    base = [sys.executable, "-m", "llmpulse"] + (["--config", args.config] if args.config else [])
    children: list[Child] = []

    def spawn(name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = logs / f"{name}.log"
        fh = open(log, "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            base + argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )  # fmt: skip
        fh.close()
        children.append(Child(name, proc, log))

    broker = EmbeddedBroker(settings.kafka.broker_port, log_dir=logs)
    broker.start()
    try:
        ensure_topics(broker.bootstrap, settings.kafka)
        update_runtime(data_dir, kafka=broker.bootstrap)
        spawn("sink", ["sink"])
        spawn("worker", ["worker", "--flush-on-exit"])
        if "notify" in commands:
            spawn("notify", ["notify"])
        if "dashboard" in commands:
            spawn("dashboard", ["dashboard"])
        if "actions" in commands and settings.actions.rules:
            spawn("actions", ["actions", "run"])
        proxy_url = None
        if args.demo:
            # mock model server <- proxy <- demo traffic (which also runs the simulated GPU)
            mock_port, proxy_port = free_port(), free_port()
            proxy_url = f"http://127.0.0.1:{proxy_port}/v1"
            spawn("mock-upstream", ["mock-upstream", "--port", str(mock_port), "--latency-ms", "40"])
            spawn("proxy", ["proxy", "--port", str(proxy_port), "--upstream", f"http://127.0.0.1:{mock_port}/v1"])
            wait_port(proxy_port)
            spawn("loadgen", ["loadgen", "--proxy", proxy_url, "--scale", str(args.demo_scale), "--rate", str(args.demo_rate)])
        print(f"llmpulse up: Kafka (embedded Tansu) on {broker.bootstrap}; data in {data_dir}", flush=True)
        print(f"  components: {', '.join(c.name for c in children)}; logs in {logs}", flush=True)
        print('  try: llmpulse query "SELECT model, count() FROM llmpulse.llm_calls FINAL GROUP BY model"', flush=True)
        if proxy_url:
            print(f"  demo: proxy {proxy_url} (point an OpenAI client's base_url here), traffic with incidents", flush=True)
        print("  Ctrl-C stops everything cleanly", flush=True)
        started = time.monotonic()
        while not stop.wait(0.5):
            if args.duration is not None and time.monotonic() - started >= args.duration:
                break
            for c in children:
                if c.proc.poll() is not None and c.name in ("worker", "sink"):
                    print(f"llmpulse up: {c.name} exited with code {c.proc.returncode}; see {c.log}", flush=True)
                    stop.set()
            if not broker.alive():
                print("llmpulse up: the embedded broker exited", flush=True)
                break
    finally:
        print("llmpulse up: stopping...", flush=True)
        by_name: dict[str, Child | None] = {c.name: c for c in children}
        for name in STOP_ORDER:
            child = by_name.pop(name, None)
            if child is not None:
                _stop_child(child)
        for rest in by_name.values():
            if rest is not None:
                _stop_child(rest)
        broker.stop()
        update_runtime(data_dir, kafka=None, query_url=None)
        print("llmpulse up: stopped", flush=True)
    return 0


def wait_port(port: int, timeout: float = 30.0) -> None:
    from llmpulse.embedded.ports import port_open

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not port_open(port):
        time.sleep(0.1)


def _stop_child(c: Child, timeout: float = 60.0) -> None:
    if c.proc.poll() is not None:
        return
    c.proc.send_signal(signal.SIGTERM)
    try:
        c.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"llmpulse up: {c.name} did not stop within {timeout:.0f} s; killing it", flush=True)
        c.proc.kill()
        c.proc.wait(10)
