"""Shared pieces of the benchmarks: a broker, a config, components as subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from llmpulse.analysis.client import query
from llmpulse.config import Settings, load_settings
from llmpulse.embedded.broker import EmbeddedBroker
from llmpulse.errors import LLMPulseError
from llmpulse.kafka.topics import ensure_topics
from llmpulse.schemas import CallEvent, encode, encode_batch
from llmpulse.sinks.notifier.logtopic import partitions_of

MODELS = ["gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet", "llama-3-70b", "mistral-large", "gemini-1.5-pro"]


@contextmanager
def broker(workdir: Path) -> Iterator[EmbeddedBroker]:
    b = EmbeddedBroker(0, log_dir=workdir).start()
    try:
        yield b
    finally:
        b.stop()


def make_config(workdir: Path, bootstrap: str, **sections: Any) -> tuple[Path, Settings]:
    data: dict[str, Any] = {
        "data_dir": str(workdir / "data"),
        "kafka": {"url": f"kafka://{bootstrap}", "topic_prefix": "bench.", "partitions": 3},
        "worker": {"windows_s": [10, 60], "grace_s": 5.0, "idle_close_s": 2.0, "batch_max_messages": 500},
        "sink": {"batch_rows": 50_000, "batch_seconds": 1.0},
    }
    for k, v in sections.items():
        if isinstance(v, dict):
            data.setdefault(k, {}).update(v)
        else:  # a top-level key (rules_file)
            data[k] = v
    path = workdir / "llmpulse.yaml"
    path.write_text(yaml.safe_dump(data))
    settings = load_settings(path, environ={})
    ensure_topics(bootstrap, settings.kafka)
    return path, settings


def start(config: Path, *argv: str, log: Path, python_args: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """`llmpulse --config CONFIG ARGV...` as a subprocess; `python_args` go to the interpreter
    before `-m llmpulse` (e.g. `-m cProfile -o FILE` to profile the component)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMPULSE_")}
    fh = open(log, "ab")  # noqa: SIM115
    p = subprocess.Popen([sys.executable, *python_args, "-m", "llmpulse", "--config", str(config), *argv],
                         stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)  # fmt: skip
    fh.close()
    return p


def stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()


def events(n: int, t0: datetime | None = None, span_s: float = 300.0) -> list[CallEvent]:
    t0 = t0 or datetime.now(UTC) - timedelta(seconds=span_s + 120)
    step = span_s / n
    return [
        CallEvent(
            event_id=f"b{i:09d}", ts=t0 + timedelta(seconds=i * step), model=MODELS[i % len(MODELS)],
            provider="openai", app=f"app{i % 5}", user=f"u{i % 50}", api_key_hash=f"k{i % 20}",
            status_code=500 if i % 50 == 0 else 200, error_type="upstream_5xx" if i % 50 == 0 else None,
            latency_ms=100 + (i % 900), ttft_ms=50 + (i % 200), prompt_tokens=100 + i % 300,
            completion_tokens=50 + i % 100, cost_usd=0.0001,
        )
        for i in range(n)
    ]


def messages(evs: list[CallEvent], batch: int) -> list[tuple[bytes, bytes]]:
    """Single-event messages (batch=1), or batch envelopes as a producer at a high rate sends
    them: each time slice of `batch` events, split by model (the partition key)."""
    if batch <= 1:
        return [(e.model.encode(), encode(e)) for e in evs]
    out = []
    for i in range(0, len(evs), batch):
        by_model: dict[str, list[CallEvent]] = {}
        for e in evs[i : i + batch]:
            by_model.setdefault(e.model, []).append(e)
        out += [(model.encode(), encode_batch(group)) for model, group in by_model.items()]
    return out


def closers(evs: list[CallEvent], after_s: float = 200.0) -> list[tuple[bytes, bytes]]:
    """One event per model far past the data, so every partition's event time passes every
    window of the data at once: the time to closed windows is then the processing time,
    not the idle-closing delay."""
    last = max(e.ts for e in evs)
    return [
        (m.encode(), encode(CallEvent(event_id=f"closer-{m}", ts=last + timedelta(seconds=after_s), model=m)))
        for m in sorted({e.model for e in evs})
    ]


def topic_reader(bootstrap: str, topics: list[str]) -> Consumer:
    """A consumer of every partition of `topics` from the first offset, assigned, not subscribed.

    A subscription joins a consumer group, and Tansu answers a JoinGroup only after about
    half the session timeout (librdkafka's default 45 s: ~23 s; llmpulse's own consumers
    use kafka.session_timeout_ms, 6 s: ~3 s). A bench timing results read through a new
    group measured that join: the worker bench's constant ~13 s (the join left over after
    the worker's start-up) was it, whatever the number of events."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-reader-{uuid.uuid4().hex}",
                  "enable.auto.commit": False, "log_level": 3})  # fmt: skip
    c.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t in topics for p in partitions_of(c, t)])
    return c


def wait_rows(settings: Settings, sql: str, ok: Callable[[Any], bool], timeout: float = 900) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            rows = query(settings, sql).rows
            if ok(rows):
                return time.monotonic()
        except LLMPulseError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for: {sql}")


def wait_sink_ready(settings: Settings, timeout: float = 60) -> None:
    """Until the sink owns the store and serves queries (never open the store ourselves first)."""
    from llmpulse.embedded.store import store_owner

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        owner = store_owner(settings.data_dir)
        if owner and owner.get("query_url"):
            return
        time.sleep(0.2)
    raise TimeoutError("the sink did not start")


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def calibration() -> dict[str, float]:
    """How fast this machine runs Python right now, recorded beside a result so figures
    from different machines, or from one machine under different load, can be compared:
    `calibration_ms` is the best of 3 runs of a fixed pure-Python loop (a result measured
    at twice another's calibration_ms ran about half as fast for the same code),
    `load_average_1m` the machine's load when the benchmark started."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        acc = 0
        for i in range(2_000_000):
            acc += i * i % 7
        best = min(best, time.perf_counter() - t0)
    return {"calibration_ms": round(best * 1000, 1), "load_average_1m": round(os.getloadavg()[0], 2)}


def counter_total(url: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus counter's series matching `labels` on a /metrics page (0 when absent)."""
    from urllib.request import urlopen

    try:
        with urlopen(url, timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total
