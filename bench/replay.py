"""Replay of sparse multi-day traffic through one worker (issue 15): events/s and window
aggregates/s when events are few per second of event time, so that closed windows and
dimension sets, not events, are what the worker spends its time on.

    python bench/run.py replay [--days 3] [--seed 1] [--rate 4.0] [--profile DIR] [--digest]

The workload is the detection benchmark's (bench/detection_workload.py: the demo's apps,
models, keys and users on a daily curve, ~2.4 calls a second on average, 4 at the peak,
a GPU host sampled every 15 s, labelled incidents), one event per Kafka message as a
user's own producer sends them, replayed through `llmpulse worker` with the shipped rules
and the worker's default windows and dimension sets. A short dev run: `--days 0.1`.

Every message is on the broker before the worker starts, so the figure is the worker's
own speed, not the producer's: the clock starts when the worker has consumed its first
event (its /metrics counter) and stops when the windows of all traffic of every window size
(10 s and 60 s) on the aggregates topic add up to every call of the workload. (It stopped
on the 60 s windows alone until 2026-12-02: the 10 s ones, published by another finalizer
partition, were then still coming, so the aggregate count at the stop ranged from 26,000
to 70,000 of 70,078 on the same half day and the figures flattered the worker.)

Keys of bench/results/replay.json:
  events_per_s        events (calls + GPU samples) / seconds
  aggregates_per_s    window aggregates published on the aggregates topic / seconds
  aggregates          of them, aggregates_10s and aggregates_60s by window size
  rss_mb              the worker's peak resident memory (VmHWM)
  seconds, events, calls, gpu_samples, days, seed, rate_per_s_peak
  worker_cpu_pct, worker_main_thread_cpu_pct, broker_cpu_pct, machine_busy_pct
                      over the run (bench/worker.py's Sampler)
  calibration_ms, load_average_1m   this machine's speed (bench/common.py)
`--digest` adds aggregates_digest, a hash of every aggregate published (sorted bytes, read
until none came for 5 s after the run), final_digest, the same of each aggregate id's highest
revision alone (what llm_aggregates FINAL keeps), and republished, the aggregates superseded by
a higher revision: the same events through two versions of the code give the same final_digest
when the figures users read are the same, to the bit (aggregates_digest also when the same
windows were published again, which depends on timing).
`--profile DIR` runs the worker under cProfile (DIR/worker.prof, and the top functions
as text in DIR/worker.txt); its figures are then slower than without.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import pstats
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from common import (
    broker,
    calibration,
    counter_total,
    make_config,
    rss_mb,
    start,
    stop,
    topic_reader,
)
from confluent_kafka import Producer
from detection import DAY_S
from detection import messages as workload_messages
from detection_workload import Traffic, Workload, day_start, plan
from worker import Sampler

from llmpulse.config import Settings
from llmpulse.embedded.ports import free_port
from llmpulse.kafka.clients import produce_all

Messages = Callable[[Settings], Iterable[tuple[str, bytes, bytes]]]


def replay_through_worker(
    msgs: Messages,
    expected_calls: Callable[[], int],
    data_end_s: float,
    worker: dict[str, Any] | None = None,
    profile: Path | None = None,
    timeout_s: float = 4 * 3600.0,
    digest: bool = False,
) -> dict[str, Any]:
    """Produce every message, then run one worker over them until the windows of all
    traffic of every window size that start at or before `data_end_s` count every call
    (`expected_calls()`, read once the messages are produced); the figures of the run."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with broker(work) as b:
            # idle_close_s 2 s, as the other benches: a calls partition that no model of the
            # workload lands on is declared empty only after idle_close_s at its end
            # (window_stage.py), and until then no window is final: a wait once at start-up
            # (30 s on the default), not the worker's speed. Partitions behind are never
            # idle-closed (their backlog is known), so it changes no window.
            config, settings = make_config(
                work, b.bootstrap,
                worker={"idle_close_s": 2.0, "batch_max_messages": 2000, **(worker or {}), "web_port": port},
            )  # fmt: skip
            t_produce = time.monotonic()
            producer = Producer({"bootstrap.servers": b.bootstrap, "linger.ms": 20, "batch.size": 1_000_000, "log_level": 3})
            produced, undelivered = produce_all(producer, msgs(settings), flush_timeout_s=120)
            if undelivered:
                raise RuntimeError(f"{undelivered} of {produced} messages not delivered")
            calls = expected_calls()
            print(f"  produced {produced} messages ({calls} calls) in {time.monotonic() - t_produce:.0f} s",
                  file=sys.stderr)  # fmt: skip
            consumer = topic_reader(b.bootstrap, [settings.kafka.topic("aggregates")])
            python_args = () if profile is None else ("-m", "cProfile", "-o", str(profile))
            proc = start(config, "worker", log=work / "worker.log", python_args=python_args)
            metrics_url = f"http://127.0.0.1:{port}/metrics"
            try:
                while counter_total(metrics_url, "llmpulse_events_in_total", component="worker") <= 0:
                    if proc.poll() is not None:
                        raise RuntimeError(f"the worker exited with {proc.returncode}: {work / 'worker.log'}")
                    time.sleep(0.05)
                t0 = time.monotonic()
                sampler = Sampler(proc.pid, b.process.pid if b.process else None).start()
                # per window size, the requests of each window of all traffic (by aggregate id,
                # so a window published again is counted once)
                totals: dict[int, dict[str, int]] = {s: {} for s in sorted(set(settings.worker.windows_s))}
                by_size: Counter[int] = Counter()
                kept: list[bytes] = []  # every aggregate's bytes, for `digest`
                last_note = t0
                while any(sum(t.values()) < calls for t in totals.values()):
                    for m in consumer.consume(10_000, 0.2):
                        if m.error() is not None:
                            continue
                        value = m.value() or b""
                        if digest:
                            kept.append(value)
                        by_size[10 if b'"window_s":10,' in value else 60 if b'"window_s":60,' in value else 0] += 1
                        if b'"dims_key":"*"' in value and b'"kind":"calls"' in value:
                            a = json.loads(value)
                            if a["window_s"] in totals and _start_s(a["window_start"]) <= data_end_s:
                                totals[a["window_s"]][a["aggregate_id"]] = a["requests"]
                    now = time.monotonic()
                    if proc.poll() is not None:
                        raise RuntimeError(f"the worker exited with {proc.returncode}: {work / 'worker.log'}")
                    if now - t0 > timeout_s:
                        raise TimeoutError(f"not done in {timeout_s} s: {_counted(totals)} of {calls} calls")
                    if now - last_note > 10:
                        last_note = now
                        print(f"  {now - t0:6.0f} s: {_counted(totals)} of {calls} calls in closed windows, "
                              f"{sum(by_size.values())} aggregates", file=sys.stderr, flush=True)  # fmt: skip
                elapsed = time.monotonic() - t0
                cpu = sampler.stop()
                if any(sum(t.values()) != calls for t in totals.values()):
                    raise AssertionError(f"{_counted(totals)} calls in the windows, expected {calls} in each size")
                peak = rss_mb(proc.pid)
                if digest:
                    kept += _rest(consumer)
            finally:
                consumer.close()
                stop(proc)
    aggregates = sum(by_size.values())
    return {
        **(_digests(kept) if digest else {}),
        "seconds": round(elapsed, 1),
        "aggregates": aggregates,
        "aggregates_10s": by_size[10],
        "aggregates_60s": by_size[60],
        "aggregates_per_s": round(aggregates / elapsed, 1),
        "rss_mb": round(peak, 1),
        "worker_cpu_pct": round(cpu["worker_cpu_pct"]),
        "worker_main_thread_cpu_pct": round(cpu["worker_main_thread_cpu_pct"]),
        "broker_cpu_pct": round(cpu["broker_cpu_pct"]),
        "machine_busy_pct": round(cpu["machine_busy_pct"]),
    }


def _rest(consumer: Any, quiet_s: float = 5.0) -> list[bytes]:
    """The aggregates still coming after the timed run (other kinds', revisions), until none
    for `quiet_s`."""
    out: list[bytes] = []
    last = time.monotonic()
    while time.monotonic() - last < quiet_s:
        for m in consumer.consume(10_000, 0.2):
            if m.error() is None:
                out.append(m.value() or b"")
                last = time.monotonic()
    return out


def _digest(values: list[bytes]) -> str:
    """One figure for "the same aggregates": the SHA-256 of every aggregate's bytes, sorted
    (their order on the topic is timing). Two runs of the same events give the same digest
    (a window's bytes do not depend on the order its partials arrive in: finalizing.py)."""
    h = hashlib.sha256()
    for v in sorted(values):
        h.update(len(v).to_bytes(4, "big") + v)
    return h.hexdigest()[:16]


def _digests(values: list[bytes]) -> dict[str, Any]:
    """`aggregates_digest` of every aggregate published; `final_digest` of each aggregate id's
    highest revision alone (what `llm_aggregates` FINAL keeps, the figures users read), and
    `republished`, how many were superseded by a higher revision. A window is published again
    when a partial reaches it after its first publication (a partition declared empty after
    `idle_close_s`, then bringing data): which windows that hits depends on timing, so the
    first digest may differ between two runs of the same code while the final one must not."""
    last: dict[str, tuple[int, bytes]] = {}
    for v in values:
        a = json.loads(v)
        seen = last.get(a["aggregate_id"])
        if seen is None or a["revision"] > seen[0]:
            last[a["aggregate_id"]] = (a["revision"], v)
    return {
        "aggregates_digest": _digest(values),
        "final_digest": _digest([v for _, v in last.values()]),
        "republished": len(values) - len(last),
    }


def _counted(totals: dict[int, dict[str, int]]) -> str:
    """The calls counted so far per window size, as text (`10 s: n, 60 s: m`)."""
    return ", ".join(f"{size} s: {sum(t.values())}" for size, t in totals.items())


def _start_s(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def profile_summary(profile: Path | None, top: int = 40) -> dict[str, Any]:
    """The cProfile stats of the worker as text beside them (DIR/worker.txt: the top
    functions by cumulative and by own time); printed, not in the result."""
    stats_file = None if profile is None else profile / "worker.prof"
    if stats_file is None or not stats_file.exists():
        return {}
    out = io.StringIO()
    stats = pstats.Stats(str(stats_file), stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    (stats_file.parent / "worker.txt").write_text(out.getvalue())
    print(f"  profile: {stats_file.parent / 'worker.txt'}", file=sys.stderr)
    return {"profiled": True}


def main() -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--days", type=float, default=3.0, help="simulated days (default 3)")
    ap.add_argument("--seed", type=int, default=1, help="redraws the traffic and its incidents")
    ap.add_argument("--rate", type=float, default=4.0, help="calls a second at the daily peak")
    ap.add_argument("--profile", type=Path, default=None, help="cProfile the worker into this folder")
    ap.add_argument("--digest", action="store_true", help="add aggregates_digest: the same aggregates, the same digest")
    args = ap.parse_args()
    cal = calibration()
    # the detection bench's 12 incidents in 3 days; shorter runs fewer, under a day none
    start_at, span_s, incidents = day_start(args.days, 0.0), args.days * DAY_S, int(args.days * 4)
    w = plan(args.seed, start_at, span_s, incidents, args.rate) if incidents else Workload(start_at, span_s, args.seed, args.rate, ())
    traffic = Traffic(w)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    r = replay_through_worker(
        lambda settings: workload_messages(w, traffic, settings),
        lambda: traffic.counts["calls"],
        w.end.timestamp(),
        profile=None if args.profile is None else args.profile / "worker.prof",
        digest=args.digest,
    )
    events = traffic.counts["calls"] + traffic.counts["gpu_samples"]
    return {
        "days": args.days,
        "seed": args.seed,
        "rate_per_s_peak": args.rate,
        "events": events,
        "calls": traffic.counts["calls"],
        "gpu_samples": traffic.counts["gpu_samples"],
        "events_per_s": round(events / r["seconds"], 1),
        **r,
        **profile_summary(args.profile),
        **cal,
    }
