"""Worker scale-out: total events/s with 1, 2 and 3 `llmpulse worker` processes on this machine.

For each worker count: a fresh topic set with 6 partitions is filled up front with call
events in batch envelopes keyed by model (100 events a message, as the proxy and SDK
publish at high rates), then N workers start in one consumer group. Progress is the events the workers
applied, read from each worker's /metrics (`llmpulse_events_in_total`, counted after the
worker's offset guard, so a message is counted once however often it is delivered); the
group's committed offsets are not used: Faust can commit past offsets it skipped (see
llmpulse/streams/contiguity.py). The rate is taken between 10% and 90% of the events, so
start-up, the group join and the tail are left out.

    python bench/run.py scale [--events N] [--workers 1,2,3]
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
import urllib.request
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from common import broker, make_config, messages, rss_mb, start, stop
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from llmpulse.schemas import CallEvent

PARTITIONS = 6
PER_MESSAGE = 100


def keyed_models(per_partition: int = 2) -> list[str]:
    """Model names spread evenly over the partitions (librdkafka's default: CRC32 of the key)."""
    per: dict[int, list[str]] = {p: [] for p in range(PARTITIONS)}
    i = 0
    while any(len(v) < per_partition for v in per.values()):
        name = f"model-{i}"
        slot = per[zlib.crc32(name.encode()) % PARTITIONS]
        if len(slot) < per_partition:
            slot.append(name)
        i += 1
    return [m for p in range(PARTITIONS) for m in per[p]]


MODELS = keyed_models()


def events(n: int, span_s: float) -> list[CallEvent]:
    t0 = datetime.now(UTC) - timedelta(seconds=span_s + 120)
    step = span_s / n
    return [
        CallEvent(
            event_id=f"s{i:09d}", ts=t0 + timedelta(seconds=i * step), model=MODELS[i % len(MODELS)],
            provider="openai", app=f"app{i % 5}", user=f"u{i % 50}", api_key_hash=f"k{i % 20}",
            status_code=500 if i % 50 == 0 else 200, error_type="upstream_5xx" if i % 50 == 0 else None,
            latency_ms=100 + (i % 900), ttft_ms=50 + (i % 200), prompt_tokens=100 + i % 300,
            completion_tokens=50 + i % 100, cost_usd=0.0001,
        )
        for i in range(n)
    ]  # fmt: skip


def fill(bootstrap: str, topic: str, n: int) -> tuple[int, dict[int, int]]:
    """Produce n events; the number of messages per partition."""
    evs = events(n, span_s=600.0)
    msgs = messages(evs, PER_MESSAGE * len(MODELS))
    per: dict[int, int] = {}

    def done(err: Any, msg: Any) -> None:
        if err is None:
            per[msg.partition()] = per.get(msg.partition(), 0) + 1

    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.size": 1_000_000, "log_level": 3})
    for key, value in msgs:
        while True:
            try:
                p.produce(topic, key=key, value=value, on_delivery=done)
                break
            except BufferError:
                p.poll(0.05)
    assert p.flush(60) == 0
    return len(msgs), per


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def applied_events(port: int) -> float:
    """Call events a worker applied so far (its /metrics)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "llmpulse_events_in":
            return sum(
                sample.value for sample in family.samples
                if sample.name.endswith("_total") and sample.labels.get("component") == "worker"
                and sample.labels.get("topic") == "calls"
            )  # fmt: skip
    return 0.0


def committed(c: Consumer, topic: str) -> dict[int, int]:
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=5)
    except Exception:
        return {}
    return {tp.partition: max(tp.offset, 0) for tp in tps}


def run_once(workdir: Path, bootstrap: str, workers: int, n_events: int) -> dict[str, float]:
    prefix = f"scale{workers}."
    config, settings = make_config(
        workdir, bootstrap,
        kafka={"topic_prefix": prefix, "partitions": PARTITIONS},
        worker={"windows_s": [10, 60], "grace_s": 5.0, "idle_close_s": 5.0, "batch_max_messages": 200},
    )  # fmt: skip
    topic = settings.kafka.topic("calls")
    _, per_partition = fill(bootstrap, topic, n_events)
    group = f"{prefix}worker"
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "log_level": 3})
    ports = [free_port() for _ in range(workers)]
    configs = []
    for i, port in enumerate(ports):
        data = yaml.safe_load(config.read_text())
        data.setdefault("worker", {})["web_port"] = port
        path = workdir / f"worker-{workers}-{i}.yaml"
        path.write_text(yaml.safe_dump(data))
        configs.append(path)
    procs = [start(cfg, "worker", log=workdir / f"worker-{workers}-{i}.log") for i, cfg in enumerate(configs)]
    marks: list[tuple[float, float]] = []
    t_start = time.monotonic()
    try:
        while time.monotonic() - t_start < 900:
            now = time.monotonic()
            done = sum(applied_events(port) for port in ports)
            marks.append((now, done))
            if done >= n_events:
                break
            for p in procs:
                assert p.poll() is None, (workdir / f"worker-{workers}-0.log").read_text()[-2000:]
            time.sleep(0.25)
        else:
            raise TimeoutError("the workers did not finish")
        rss = max(rss_mb(p.pid) for p in procs)
        offs = committed(c, topic)
    finally:
        for p in procs:
            stop(p)
        c.close()

    def at(frac: float) -> tuple[float, float]:
        for t, done in marks:
            if done >= frac * n_events:
                return t, done
        return marks[-1]

    (t10, d10), (t90, d90) = at(0.1), at(0.9)
    span = max(t90 - t10, 1e-6)
    total = (d90 - d10) / span
    lag = {p: per_partition.get(p, 0) - offs.get(p, 0) for p in range(PARTITIONS)}
    return {
        f"events_per_s_{workers}_workers": round(total),
        f"events_per_s_per_worker_{workers}_workers": round(total / workers),
        f"events_per_s_per_partition_{workers}_workers": round(total / PARTITIONS),
        f"messages_left_uncommitted_{workers}_workers": sum(max(0, v) for v in lag.values()),
        f"partitions_per_worker_{workers}_workers": round(PARTITIONS / workers, 2),
        f"seconds_to_drain_{workers}_workers": round(marks[-1][0] - t_start, 1),
        f"worker_rss_max_mb_{workers}_workers": round(rss, 1),
    }


def main() -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=600_000)
    ap.add_argument("--workers", default="1,2,3")
    args = ap.parse_args()
    counts = [int(x) for x in args.workers.split(",")]
    out: dict[str, Any] = {
        "events": args.events, "partitions": PARTITIONS, "events_per_message": PER_MESSAGE,
        "cpu_cores": os.cpu_count() or 0,
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="llmpulse-scale-") as tmp:
        workdir = Path(tmp)
        with broker(workdir) as b:
            for n in counts:
                out.update(run_once(workdir, b.bootstrap, n, args.events))
    base = out.get("events_per_s_1_workers")
    for n in counts:
        if base and n > 1:
            out[f"speedup_{n}_workers"] = round(out[f"events_per_s_{n}_workers"] / base, 2)
    return out
