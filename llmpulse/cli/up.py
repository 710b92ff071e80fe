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
        "notifier, the dashboard and the HTTP ingest. --demo adds a mock upstream model server, the "
        "proxy, a simulated GPU and traffic with injected incidents. The first lines printed give "
        "the URL of the dashboard, the proxy, ingest, the query endpoint and each /metrics.",
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
    # entries of an earlier run must not pass for this run's addresses
    update_runtime(data_dir, dashboard=None, query_url=None, ingest=None, proxy=None)
    try:
        ensure_topics(broker.bootstrap, settings.kafka)
        update_runtime(data_dir, kafka=broker.bootstrap)
        spawn("sink", ["sink"])
        spawn("worker", ["worker", "--flush-on-exit"])
        if "notify" in commands:
            spawn("notify", ["notify"])
        dashboard_url = None
        if "dashboard" in commands:
            dashboard_port = settings.dashboard.port or free_port()
            dashboard_url = f"http://{_shown(settings.dashboard.host)}:{dashboard_port}"
            spawn("dashboard", ["dashboard", "--port", str(dashboard_port)])
        ingest_url = None
        if "ingest" in commands:
            ingest_port = settings.ingest.port or free_port()
            ingest_url = f"http://{_shown(settings.ingest.host)}:{ingest_port}"
            spawn("ingest", ["ingest", "--port", str(ingest_port)])
        if "actions" in commands and settings.actions.rules:
            spawn("actions", ["actions", "run"])
        proxy_url = None
        if args.demo:
            # mock model server <- proxy <- demo traffic (which also runs the simulated GPU)
            mock_port, proxy_port = free_port(), free_port()
            proxy_url = f"http://127.0.0.1:{proxy_port}"
            spawn("mock-upstream", ["mock-upstream", "--port", str(mock_port), "--latency-ms", "40"])
            spawn("proxy", ["proxy", "--port", str(proxy_port), "--upstream", f"http://127.0.0.1:{mock_port}/v1"])
            wait_port(proxy_port)
            spawn("loadgen", ["loadgen", "--proxy", f"{proxy_url}/v1", "--scale", str(args.demo_scale), "--rate", str(args.demo_rate)])
        update_runtime(data_dir, ingest=ingest_url, proxy=proxy_url)
        embedded = settings.clickhouse.embedded
        for line in where_everything_is(data_dir, children, stop, dashboard_url, ingest_url, proxy_url, embedded):
            print(line, flush=True)
        print(f"  kafka:     {broker.bootstrap} (embedded Tansu); data in {data_dir}", flush=True)
        print(f"  components: {', '.join(c.name for c in children)}; logs in {logs}", flush=True)
        print('  try: llmpulse query "SELECT model, count() FROM llmpulse.llm_calls FINAL GROUP BY model"', flush=True)
        if proxy_url:
            print("  demo: traffic with incidents through the proxy (a mock upstream answers)", flush=True)
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
        update_runtime(data_dir, kafka=None, query_url=None, ingest=None, proxy=None)
        print("llmpulse up: stopped", flush=True)
    return 0


def _shown(host: str) -> str:
    """The address a user on this machine types: loopback for a wildcard bind."""
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _answers(url: str) -> bool:
    from urllib.parse import urlparse

    from llmpulse.embedded.ports import port_open

    u = urlparse(url)
    return u.port is not None and port_open(u.port, u.hostname or "127.0.0.1")


def where_everything_is(
    data_dir: Path, children: list[Child], stop: threading.Event, dashboard_url: str | None,
    ingest_url: str | None, proxy_url: str | None, embedded: bool, timeout: float = 90.0,
) -> list[str]:
    """The first lines `up` prints: each endpoint's URL once it answers, or where to look.

    With the embedded store the dashboard and the sink's query endpoint write their URLs to
    runtime.json once they listen, so a port held by some other program never passes for
    ours (runtime.json was cleared before they started)."""
    from llmpulse.embedded.runtime_file import read_runtime

    by_name = {c.name: c for c in children}
    deadline = time.monotonic() + timeout

    def urls() -> dict[str, object]:
        rt = read_runtime(data_dir)
        dash = rt.get("dashboard") if embedded else dashboard_url
        return {"dashboard": _shown_url(dash) if isinstance(dash, str) else None,
                "sink": rt.get("query_url"), "ingest": ingest_url}  # fmt: skip

    def pending() -> list[str]:
        want = urls() if embedded else {"dashboard": dashboard_url, "ingest": ingest_url}
        return [n for n, url in want.items() if n in by_name and by_name[n].proc.poll() is None
                and not (isinstance(url, str) and _answers(url))]  # fmt: skip

    while pending() and time.monotonic() < deadline and not stop.is_set():
        time.sleep(0.2)
    got = urls()

    def shown(name: str, url: object) -> str | None:
        child = by_name.get(name)
        if child is None:
            return None
        if isinstance(url, str) and child.proc.poll() is None and _answers(url):
            return url
        state = f"exited with code {child.proc.returncode}" if child.proc.poll() is not None else "not answering yet"
        return f"{state}; see {child.log}"

    dashboard = got["dashboard"]
    query_url = got["sink"]
    lines = ["llmpulse up: running"]
    if (d := shown("dashboard", dashboard)) is not None:
        lines.append(f"  dashboard: {d}/" if d == dashboard else f"  dashboard: {d}")
    if proxy_url and (p := shown("proxy", proxy_url)) is not None:
        lines.append(f"  proxy:     {p}/v1 (an OpenAI client's base_url; an Anthropic client's: {p})"
                     if p == proxy_url else f"  proxy:     {p}")  # fmt: skip
    if (i := shown("ingest", ingest_url)) is not None:
        lines.append(f"  ingest:    {i}/ingest/calls, OTLP {i}/v1/traces" if i == ingest_url else f"  ingest:    {i}")
    if not embedded:
        lines.append("  query:     the ClickHouse server itself (clickhouse.url; `llmpulse query` reads it)")
    elif (q := shown("sink", query_url)) is not None:
        lines.append(f"  query:     {q}/query (what `llmpulse query` uses)" if q == query_url else f"  query:     {q}")
    metrics = [f"{url}/metrics ({name})" for name, url in (("dashboard", dashboard), ("sink", query_url),
               ("proxy", proxy_url), ("ingest", ingest_url)) if isinstance(url, str) and name in by_name]  # fmt: skip
    if metrics:
        lines.append(f"  metrics:   {', '.join(metrics)}")
    return lines


def _shown_url(url: str) -> str:
    from urllib.parse import urlparse

    u = urlparse(url)
    return f"{u.scheme}://{_shown(u.hostname or '')}:{u.port}" if u.port else url


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
