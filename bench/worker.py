"""Events/s through one worker process with all default rules on, end to end from the
topic to closed windows on the aggregates topic, for single-event messages and batches;
the worker's memory over 5 million events; and where the worker's wall-clock goes.

    python bench/run.py worker [--events N] [--single-events N] [--rss-events N]
                               [--set section.key=value ...] [--profile DIR]
                               [--cprofile-single FILE]

Each run: a fresh embedded broker and topic set, one `llmpulse worker`, the events
produced from a thread while the worker consumes (the clock starts when producing
starts, once the worker has consumed a warm-up GPU sample: joined its groups, read its
state), done when the 60 s global windows of the data on the aggregates topic add up
to every event. During each run the worker's CPU time (all threads, and its main
thread, the asyncio loop) is read from /proc, with the broker's and the whole
machine's: `*_worker_cpu_pct` is the worker's CPU seconds per wall second in percent
(100 = one core busy all the time), so 100 - `*_worker_main_thread_cpu_pct` is the
share of the run its event loop spent waiting (or, on a loaded machine, waiting for a
core: compare `*_machine_busy_pct`); `*_cpu_bound_events_per_s` is the events over the
worker's CPU seconds, the rate one worker would reach if it never waited.

The memory run (`--rss-events`, default 5,000,000; 0 skips it) sends envelopes of
`--batch` events over `--rss-span-s` seconds of event time, encoded straight with
msgspec (building 5 million pydantic models would take longer than the run), and
samples the worker's resident memory every 0.5 s: `rss_5m_events_peak_mb` (VmHWM),
`rss_5m_events_final_mb` (VmRSS once every window is closed). It takes about 4 to 5
minutes on the 2-core bench machine; the whole default run about 7.

The batched run spreads its events over `--span-s` seconds of event time (default 300:
3,333 events per event-time second, so windows close, partials merge and rules run 15
times more often per event than in a live stream at 50,000 events/s; `--span-s 20`
gives a live stream's density at that rate).

`--set worker.batch_max_messages=5000` (repeatable) overrides the worker's config for
every run; `--rules FILE` runs the worker with that rules file instead of the built-in
defaults (`--rules none`: an empty one, no rules at all: the rules' share of the
worker's time is the difference, issue 14 wants it under 10 %); `--profile DIR` records the batched run's worker with py-spy (wall clock,
idle included; raw collapsed stacks in DIR/worker.txt, a summary in the result; py-spy is
not a project dependency: without it `--profile` stops at once and says so);
`--cprofile-single FILE` runs the single-event run's worker under cProfile (its main
thread, the event loop: CPU per function, FILE is a pstats file written when it stops).

`single_events_per_s` is the rate of the single-event run (one event per message, as
users' own producers send them), over a backlog: every message is on the broker before
the worker starts (a catch-up after an outage; while the clock ran, one Python producer
of single messages on the same 2 cores fed the worker slower than it consumed: 37% busy), of
200,000 events by default: a run of 50,000 lasts about 2 s at 30,000/s, and the fixed part
of a run (the first fetch, the last windows' close and finalization, about 0.4 s) halved
its rate (11,793 events/s at 42c18d2, the worker 49% busy); `calibration_ms` says how fast the machine ran Python
at the start (bench/common.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
from common import (
    MODELS,
    broker,
    calibration,
    closers,
    counter_total,
    events,
    make_config,
    messages,
    start,
    stop,
    topic_reader,
)

from llmpulse.embedded.ports import free_port
from tests.kafkatools import produce

TICK = os.sysconf("SC_CLK_TCK")


# -- /proc readings -----------------------------------------------------------------------------
def _cpu_s(stat_path: str) -> float:
    """utime + stime of a process or thread, in seconds."""
    try:
        text = Path(stat_path).read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _status_kb(pid: int, name: str) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine."""
    vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = vals[3] + vals[4]
    return sum(vals) - idle, sum(vals)


class Sampler:
    """CPU of the worker (all threads, main thread), the broker and the machine between
    start() and stop(); the worker's resident memory every `every` seconds."""

    def __init__(self, worker: int, broker_pid: int | None, every: float = 0.5) -> None:
        self.worker = worker
        self.broker = broker_pid
        self.every = every
        self.rss_max = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> tuple[float, float, float, tuple[float, float], float]:
        broker_cpu = _cpu_s(f"/proc/{self.broker}/stat") if self.broker else 0.0
        return (
            _cpu_s(f"/proc/{self.worker}/stat"), _cpu_s(f"/proc/{self.worker}/task/{self.worker}/stat"),
            broker_cpu, _machine_busy(), time.monotonic(),
        )  # fmt: skip

    def start(self) -> Sampler:
        self._start = self._read()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.rss_max = max(self.rss_max, _status_kb(self.worker, "VmRSS"))
            self.samples += 1

    def stop(self) -> dict[str, float]:
        end = self._read()
        self._stop.set()
        self._thread.join()
        w0, m0, b0, (busy0, tot0), t0 = self._start
        w1, m1, b1, (busy1, tot1), t1 = end
        wall = t1 - t0
        return {
            "wall_s": wall,
            "worker_cpu_s": w1 - w0,
            "worker_cpu_pct": 100 * (w1 - w0) / wall,
            "worker_main_thread_cpu_pct": 100 * (m1 - m0) / wall,
            "broker_cpu_pct": 100 * (b1 - b0) / wall,
            "machine_busy_pct": 100 * (busy1 - busy0) / max(1, tot1 - tot0),
            "rss_sampled_max_mb": self.rss_max,
        }


# -- events -------------------------------------------------------------------------------------
_enc = msgspec.json.Encoder()


def fast_messages(n: int, batch: int, span_s: float, t0: datetime) -> Iterator[tuple[bytes, bytes]]:
    """The same events as common.events()/messages() (envelopes split by model), encoded with
    msgspec chunk by chunk as they are produced, so 5 million cost seconds and little memory."""
    step = span_s / n
    for lo in range(0, n, batch):
        by_model: dict[str, list[dict[str, Any]]] = {}
        for i in range(lo, min(n, lo + batch)):
            e: dict[str, Any] = {
                "event_id": f"b{i:09d}", "ts": t0 + timedelta(seconds=i * step), "model": MODELS[i % len(MODELS)],
                "provider": "openai", "app": f"app{i % 5}", "user": f"u{i % 50}", "api_key_hash": f"k{i % 20}",
                "status_code": 500 if i % 50 == 0 else 200, "latency_ms": 100 + (i % 900), "ttft_ms": 50 + (i % 200),
                "prompt_tokens": 100 + i % 300, "completion_tokens": 50 + i % 100, "cost_usd": 0.0001,
            }  # fmt: skip
            if i % 50 == 0:
                e["error_type"] = "upstream_5xx"
            by_model.setdefault(e["model"], []).append(e)
        for model, group in by_model.items():
            yield model.encode(), _enc.encode({"schema_version": 1, "events": group})
    last = t0 + timedelta(seconds=(n - 1) * step)
    for m in sorted(set(MODELS[: min(n, len(MODELS))])):
        closer = {"event_id": f"closer-{m}", "ts": last + timedelta(seconds=200), "model": m}
        yield m.encode(), _enc.encode(closer)


# -- one run ------------------------------------------------------------------------------------
def _py_spy() -> str | None:
    """py-spy beside this Python (a venv's bin), else on PATH; None: not installed (it is not
    one of the project's dependencies: `--profile` is for a developer who installed it)."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _profiler(pid: int, out: Path) -> subprocess.Popen[bytes]:
    spy = _py_spy()
    assert spy is not None  # checked before the run starts
    return subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--idle", "--rate", "200", "--format", "raw",
         "--output", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=open(str(out) + ".log", "wb"),
    )  # fmt: skip


def run_once(
    n: int,
    msgs: Iterable[tuple[bytes, bytes]],
    data_end: float,
    overrides: dict[str, Any],
    profile: Path | None = None,
    cprofile: Path | None = None,
    backlog: bool = False,
) -> dict[str, float]:
    """One worker over `msgs`: produced while the clock runs, or (`backlog`) all on the
    broker before the worker starts, the clock from its first event consumed (the worker's
    own speed: one Python producer of single-event messages on these 2 cores feeds the
    worker slower than it takes them, and takes CPU from it)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with broker(work) as b:
            port = free_port()
            wcfg = {**overrides.get("worker", {}), "web_port": port}
            config, settings = make_config(work, b.bootstrap, **{**overrides, "worker": wcfg})
            python_args = ("-m", "cProfile", "-o", str(cprofile.resolve())) if cprofile is not None else ()
            if backlog:
                produce(b.bootstrap, settings.kafka.topic("calls"), msgs)
            worker = start(config, "worker", log=work / "worker.log", python_args=python_args)
            consumer = topic_reader(b.bootstrap, [settings.kafka.topic("aggregates")])
            spy = None
            try:
                # the clock starts once the worker consumes: it has joined its groups and read its
                # state. A fixed 10 s sleep used to stand in for that. Both runs still measured a
                # constant ~13 s (1M batched and 50k single events both took 13.3 s, 2,000 single
                # 13.2 s): this reader's own group join (~23 s on Tansu with librdkafka's default
                # session timeout) less the worker's start-up; it is assigned now (topic_reader)
                if backlog:
                    _wait_first_event(f"http://127.0.0.1:{port}/metrics", worker)
                else:
                    _wait_consuming(b.bootstrap, settings, f"http://127.0.0.1:{port}/metrics", worker)
                if profile is not None:
                    spy = _profiler(worker.pid, profile)
                    time.sleep(1)
                sampler = Sampler(worker.pid, b.process.pid if b.process else None).start()
                t0 = time.monotonic()
                producer = threading.Thread(
                    target=produce,
                    args=(b.bootstrap, settings.kafka.topic("calls"), [] if backlog else msgs),
                    daemon=True,
                )
                producer.start()
                seen: dict[str, int] = {}
                deadline = time.monotonic() + 1800
                while time.monotonic() < deadline:
                    for m in consumer.consume(10_000, 0.2):
                        if m.error() is not None:
                            continue
                        a = json.loads(m.value() or b"{}")
                        if (
                            a.get("kind") == "calls"
                            and a["window_s"] == 60
                            and a["dims_key"] == "*"
                            and datetime.fromisoformat(a["window_start"]).timestamp() <= data_end
                        ):
                            seen[a["aggregate_id"]] = a["requests"]
                    if sum(seen.values()) >= n:
                        break
                    if worker.poll() is not None:
                        raise RuntimeError(
                            f"the worker exited with {worker.returncode}; see its log"
                        )
                elapsed = time.monotonic() - t0
                cpu = sampler.stop()
                producer.join(60)
                assert sum(seen.values()) == n, (
                    f"{sum(seen.values())} of {n} events in closed windows"
                )
                peak = _status_kb(worker.pid, "VmHWM")
                final = _status_kb(worker.pid, "VmRSS")
            finally:
                if spy is not None:
                    spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
                    try:
                        spy.wait(30)
                    except subprocess.TimeoutExpired:
                        spy.kill()
                consumer.close()
                stop(worker)
    return {
        "events_per_s": n / elapsed,
        "seconds": elapsed,
        "rss_peak_mb": peak,
        "rss_final_mb": final,
        **cpu,
    }


def _wait_first_event(metrics_url: str, worker: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 180
    while counter_total(metrics_url, "llmpulse_events_in_total", component="worker") < 1:
        if worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the worker did not start consuming; see its log")
        time.sleep(0.02)


def _wait_consuming(bootstrap: str, settings: Any, metrics_url: str, worker: subprocess.Popen[bytes]) -> None:
    """Produce one GPU sample (a kind of its own: the calls' windows do not see it) until the
    worker has consumed it."""
    sample = {"host": "bench-warmup", "gpu_index": 0, "utilization_gpu_pct": 1.0}
    produce(bootstrap, settings.kafka.topic("gpu"), [(b"bench-warmup", _enc.encode(sample))])
    deadline = time.monotonic() + 180
    while counter_total(metrics_url, "llmpulse_events_in_total", component="worker") < 1:
        if worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the worker did not start consuming; see its log")
        time.sleep(0.2)


# -- py-spy summary -----------------------------------------------------------------------------
LOOP_FRAMES = {
    "Worker.execute_from_commandline (mode/worker.py:264)",
    "BaseEventLoop.run_forever (asyncio/base_events.py:607)",
    "BaseEventLoop.run_until_complete (asyncio/base_events.py:640)",
}


def summarize_profile(path: Path, top: int = 20) -> dict[str, Any]:
    """From py-spy's raw collapsed stacks (--idle): per thread kind, the share of samples
    idle (the leaf is the selector's select); for the main thread (the worker's event
    loop) the top functions of its busy samples, inclusive (on the stack) and self (leaf)."""
    threads: dict[str, list[int]] = {}
    inclusive: dict[str, int] = {}
    leaf: dict[str, int] = {}
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        count = int(count_text)
        main_thread = frames[0].startswith("_run_module_as_main")
        idle = "select (selectors.py" in frames[-1] or frames[-1].startswith("_worker (concurrent")
        kind = (
            "main"
            if main_thread
            else "consumer"
            if any("aiokafka" in f for f in frames)
            else "other"
        )
        if not main_thread and "EpollSelector.select" in frames[-1] and len(frames) < 12:
            kind = "consumer"  # the consumer thread's own loop, waiting
        t = threads.setdefault(kind, [0, 0])
        t[0] += count
        if idle:
            t[1] += count
            continue
        if main_thread:
            for f in set(frames[1:]):
                if f in LOOP_FRAMES or f.startswith(("_run_code", "<module>", "main (", "run (")):
                    continue
                inclusive[f] = inclusive.get(f, 0) + count
            leaf[frames[-1]] = leaf.get(frames[-1], 0) + count
    main_total, main_idle = threads.get("main", [0, 0])
    busy = max(1, main_total - main_idle)

    def ranked(d: dict[str, int]) -> list[tuple[str, float]]:
        return [
            (f, round(100 * c / busy, 1)) for f, c in sorted(d.items(), key=lambda x: -x[1])[:top]
        ]

    return {
        "samples_by_thread": {k: v[0] for k, v in threads.items()},
        "idle_pct_by_thread": {k: round(100 * v[1] / max(1, v[0]), 1) for k, v in threads.items()},
        "main_idle_pct": round(100 * main_idle / max(1, main_total), 1),
        "main_top_inclusive_pct_of_busy": ranked(inclusive),
        "main_top_self_pct_of_busy": ranked(leaf),
    }


def _overrides(pairs: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        dotted, _, value = pair.partition("=")
        section, _, key = dotted.partition(".")
        if not key or not value:
            raise SystemExit(f"--set wants section.key=value, got {pair!r}")
        out.setdefault(section, {})[key] = (
            json.loads(value) if value[0] in "[{0123456789-tf" else value
        )
    return out


def _cpu_keys(prefix: str, r: dict[str, float], n: int) -> dict[str, float]:
    return {
        # the worker's CPU cost, and the rate it would reach with one core busy all the time
        f"{prefix}worker_cpu_s_per_million_events": round(r["worker_cpu_s"] * 1e6 / n, 1),
        f"{prefix}cpu_bound_events_per_s": round(n / max(1e-9, r["worker_cpu_s"])),
        f"{prefix}worker_cpu_pct": round(r["worker_cpu_pct"]),
        f"{prefix}worker_main_thread_cpu_pct": round(r["worker_main_thread_cpu_pct"]),
        f"{prefix}broker_cpu_pct": round(r["broker_cpu_pct"]),
        f"{prefix}machine_busy_pct": round(r["machine_busy_pct"]),
    }


def main() -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000, help="events in batch envelopes")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument(
        "--single-events", type=int, default=200_000, help="events as one message each (0: skip)"
    )
    ap.add_argument(
        "--rss-events", type=int, default=5_000_000, help="events of the memory run (0: skip)"
    )
    ap.add_argument(
        "--rss-span-s", type=float, default=600.0, help="event-time span of the memory run"
    )
    ap.add_argument(
        "--span-s",
        type=float,
        default=300.0,
        help="event-time span of the batched run (events/span = events per second of event time)",
    )
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument(
        "--rules", default=None, metavar="FILE", help="rules file of the worker ('none': no rules)"
    )
    ap.add_argument(
        "--profile", type=Path, default=None, help="py-spy the batched run into this folder"
    )
    ap.add_argument(
        "--cprofile-single", type=Path, default=None, help="cProfile the single-event run's worker into this file"
    )
    args = ap.parse_args()
    overrides: dict[str, Any] = dict(_overrides(args.set))
    if args.rules is not None:
        rules_file = Path(args.rules).resolve()
        if args.rules == "none":
            rules_file = Path(tempfile.mkdtemp()) / "no-rules.yaml"
            rules_file.write_text("version: 1\nrules: []\n")
        overrides["rules_file"] = str(rules_file)
    out: dict[str, Any] = {
        "events": args.events,
        "events_per_message": args.batch,
        "span_s": args.span_s,
    }
    if args.set:
        out["overrides"] = " ".join(args.set)
    out |= calibration()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    dirty = (
        subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "llmpulse"], check=False).returncode
        != 0
    )
    out["code_commit"] = (commit.stdout.strip() or "unknown") + (
        " + uncommitted llmpulse/ changes" if dirty else ""
    )

    prof = None
    if args.profile is not None and _py_spy() is None:
        raise SystemExit(
            "--profile records the worker with py-spy, which is not installed here "
            "(pip install py-spy); --cprofile-single FILE profiles with the standard library's cProfile"
        )
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        prof = args.profile / "worker.txt"
    if args.events:  # 0: only the single-event and memory runs
        evs = events(args.events, span_s=args.span_s)
        data_end = max(e.ts for e in evs).timestamp()
        msgs = messages(evs, args.batch) + closers(evs)
        del evs
        batched = run_once(args.events, msgs, data_end, overrides, profile=prof)
        del msgs
        out |= {
            "events_per_s": round(batched["events_per_s"]),
            "seconds": round(batched["seconds"], 1),
            "rss_mb": round(batched["rss_peak_mb"], 1),
            **_cpu_keys("", batched, args.events),
        }
    if prof is not None and prof.exists():
        summary = summarize_profile(prof)
        (args.profile / "summary.json").write_text(json.dumps(summary, indent=2))
        out["profile_main_thread_idle_pct"] = summary["main_idle_pct"]

    if args.single_events:
        evs = events(args.single_events)
        data_end = max(e.ts for e in evs).timestamp()
        single = run_once(
            args.single_events, messages(evs, 1) + closers(evs), data_end, overrides,
            cprofile=args.cprofile_single, backlog=True,
        )  # fmt: skip
        out |= {
            "single_events": args.single_events,
            "single_events_per_s": round(single["events_per_s"]),
            "single_measured_as": "backlog: every message on the broker before the worker starts",
            "single_rss_mb": round(single["rss_peak_mb"], 1),
            **_cpu_keys("single_", single, args.single_events),
        }

    if args.rss_events:
        n = args.rss_events
        t_start = datetime.now(UTC) - timedelta(seconds=args.rss_span_s + 120)
        data_end = (t_start + timedelta(seconds=args.rss_span_s * (n - 1) / n)).timestamp()
        # encoded before the clock starts, as the other runs are: encoding them while the
        # worker runs would take a good part of the 2 cores from it
        big_msgs = list(fast_messages(n, args.batch, args.rss_span_s, t_start))
        big = run_once(n, big_msgs, data_end, overrides)
        del big_msgs
        out |= {
            "rss_events": n,
            "rss_events_span_s": args.rss_span_s,
            "rss_5m_events_peak_mb": round(big["rss_peak_mb"], 1),
            "rss_5m_events_final_mb": round(big["rss_final_mb"], 1),
            "rss_5m_events_sampled_max_mb": round(big["rss_sampled_max_mb"], 1),
            "rss_5m_events_events_per_s": round(big["events_per_s"]),
            "rss_5m_events_seconds": round(big["seconds"], 1),
            **_cpu_keys("rss_5m_", big, n),
        }
    out["rules"] = (
        "built-in defaults (all on)" if args.rules is None
        else "none (empty rules file)" if args.rules == "none" else args.rules
    )  # fmt: skip
    out["dimension_sets"] = "global, model, provider, app, user, api key; windows 10 s and 60 s"
    return out
