"""Latency the proxy adds: the mock upstream called directly vs through the proxy.

Setup. The mock upstream (`llmpulse mock-upstream`) and the proxy (`llmpulse proxy`,
publishing every call to a real embedded Tansu broker) run as subprocesses. On a
machine with 2+ CPUs the proxy, every thread of it (librdkafka's and the publisher's
included), is pinned alone to the last CPU; the load generator (this process), the
mock upstream and the broker, every thread of each, to the other CPUs. The pinning is
read back from /proc and recorded (`pin_*`), with each phase's per-CPU busy share
(`..._cpuN_busy_percent`: other work on the machine shows up there).

Load. Open loop at a fixed rate (500 and 1,000 requests/s), non-streamed and streamed
(16-token SSE streams read to the end), after a one-second warm-up at the same rate.
Request i is due at start + i/rate; the generator sends every due request when it
wakes, never waiting for answers (a pool of keep-alive connections, more opened if
all are busy), so a slow proxy cannot hold sends back (no coordinated omission). It
is a minimal HTTP/1.1 client on raw asyncio transports (uvloop when installed), so
that its own CPU is not the tail being measured. The direct baseline is measured with
the same generator in the same way, in `--rounds` alternating direct/proxied run pairs
(latencies pooled per side), so that both sides meet the same conditions.

- `..._p99_ms` (the headline): from the moment the request was written to the last
  response byte read;
- `..._from_schedule_p99_ms`: from the request's scheduled send time instead; it adds
  the generator's own lateness (`generator_send_lag_p*_ms`: its timer wakes with 1 ms
  granularity), the same for both sides in distribution but not run by run.

Added latency at percentile p = p(through the proxy) - p(direct), each side pooled
over its runs (the difference of percentiles, the usual way: requests cannot be
paired). Also reported: the proxy's own `x-llmpulse-overhead-ms` header (time in the
proxy, not waiting on the upstream), its CPU (percent of one core), RSS and peak RSS.

Isolation. On a machine shared with other work (this project's 2-core dev box runs
other engineers' tests at the same time) the pinned CPUs are not the benchmark's
alone. As root the benchmark therefore runs every thread of its processes under
SCHED_FIFO (`--realtime PRIO`, default 10; `--realtime 0` turns it off): they run
whenever ready, as on CPUs of their own, and since they block on I/O the rest of the
machine keeps running. `sched_policy` records what was used; the 1,000 requests/s
runs are then repeated without it (`unisolated_*`, `--unisolated-rounds`), to show
what the other work on the machine does to the figures. Each phase records
the proxy's run-queue wait (`..._proxy_runqueue_wait_ms_per_s`: time its threads
were ready but another task had the CPU; `..._proxy_loop_thread_*`: the event loop's
thread alone, and the CPU of the publisher's and librdkafka's threads), the per-CPU
busy share and the load.

    python bench/run.py proxy [--seconds 3] [--rounds 3] [--proxy-loop auto|uvloop|asyncio]
                              [--realtime PRIO | --realtime 0 [--nice N]]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, cast

from llmpulse.embedded.broker import EmbeddedBroker
from llmpulse.embedded.ports import free_port
from llmpulse.kafka.topics import ensure_topics
from llmpulse.producers.proxy.loop import run as run_loop
from llmpulse.producers.proxy.loop import uvloop_available

RATES = (500, 1000)
BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say something about latency."}]}'
STREAM_BODY = BODY[:-1] + b',"stream":true}'
AUTH = "Bearer sk-bench-not-a-real-key"
OVERHEAD = "x-llmpulse-overhead-ms"
WARM_S = 1.0
CONNECTIONS = 64  # opened before each run; more are opened if ever all are busy


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_times() -> dict[int, tuple[int, int]]:
    """Per CPU: (busy, total) jiffies from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            f = [int(x) for x in line.split()[1:]]
            idle = f[3] + f[4]
            out[int(line.split()[0][3:])] = (sum(f[:8]) - idle, sum(f[:8]))
    return out


def _busy(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> dict[int, float]:
    return {
        c: round(100 * (after[c][0] - before[c][0]) / max(1, after[c][1] - before[c][1]), 1) for c in after if c in before
    }


def _pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of `pid` (threads started later inherit their creator's mask)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setaffinity(int(tid), cpus)


def _affinity(pid: int) -> str:
    """The CPUs of every thread of `pid`, e.g. "1" or "0,1" (mixed: "0|0,1")."""
    masks = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            masks.add(",".join(str(c) for c in sorted(os.sched_getaffinity(int(tid)))))
    return "|".join(sorted(masks))


def _renice(pid: int, nice: int) -> None:
    """Every thread of `pid` at `nice` (Linux priorities are per thread)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)


def _realtime(pid: int, prio: int) -> None:
    """Every thread of `pid` under SCHED_FIFO at `prio` (needs root): on a machine shared with
    other work, the benchmark's processes then run whenever they are ready, as on CPUs of
    their own; they block on I/O, and the kernel keeps 5% of each CPU for other tasks."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setscheduler(int(tid), os.SCHED_FIFO, os.sched_param(prio))


def _unrealtime(pid: int) -> None:
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setscheduler(int(tid), os.SCHED_OTHER, os.sched_param(0))


def _policy(pid: int) -> str:
    pol = os.sched_getscheduler(pid)
    if pol == os.SCHED_FIFO:
        return f"SCHED_FIFO {os.sched_getparam(pid).sched_priority}"
    return f"SCHED_OTHER nice {os.getpriority(os.PRIO_PROCESS, pid)}"


def _sched(pid: int) -> tuple[float, float]:
    """(seconds on CPU, seconds runnable but waiting for a CPU), all threads of `pid`."""
    run = wait = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            f = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
        except OSError:
            continue
        run, wait = run + int(f[0]), wait + int(f[1])
    return run / 1e9, wait / 1e9


def _thread_times(pid: int) -> dict[int, tuple[float, float]]:
    """Per thread of `pid`: (seconds on CPU, seconds waiting for a CPU)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            f = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
        except OSError:
            continue
        out[int(tid)] = (int(f[0]) / 1e9, int(f[1]) / 1e9)
    return out


def _wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


# ---- the load generator: HTTP/1.1 keep-alive on raw transports ----


class _Conn(asyncio.Protocol):
    """One keep-alive connection, one request at a time; parses Content-Length and
    chunked responses (the streamed ones) just enough to know where they end."""

    def __init__(self, gen: _Generator) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.req = -1
        self.state = 0  # 0 head, 1 sized body, 2 chunked body
        self.need = 0
        self.status = 0
        self.overhead = math.nan

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports subclass nothing
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.req >= 0:
            i, self.req = self.req, -1
            self.gen.finish(i, -1, math.nan)
        self.gen.lost(self)

    def send(self, i: int) -> None:
        assert self.transport is not None
        self.req = i
        self.gen.sent[i] = time.perf_counter()
        self.transport.write(self.gen.request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while buf:
            if self.state == 0:
                j = buf.find(b"\r\n\r\n")
                if j < 0:
                    return
                lines = bytes(buf[:j]).decode("latin-1").split("\r\n")
                del buf[: j + 4]
                self.status = int(lines[0].split(" ", 2)[1])
                self.overhead = math.nan
                self.need, self.state = 0, 1
                for ln in lines[1:]:
                    k, _, v = ln.partition(":")
                    k = k.strip().lower()
                    if k == "content-length":
                        self.need = int(v)
                    elif k == "transfer-encoding" and "chunked" in v.lower():
                        self.state = 2
                    elif k == OVERHEAD:
                        self.overhead = float(v)
            if self.state == 1:
                if len(buf) < self.need:
                    return
                del buf[: self.need]
                self._done()
            elif self.state == 2:
                j = buf.find(b"\r\n")
                if j < 0:
                    return
                size = int(bytes(buf[:j]).split(b";")[0], 16)
                if size == 0:
                    end = buf.find(b"\r\n\r\n", j)
                    if end < 0:
                        return
                    del buf[: end + 4]
                    self._done()
                else:
                    if len(buf) < j + 4 + size:
                        return
                    del buf[: j + 4 + size]

    def _done(self) -> None:
        self.state = 0
        i, self.req = self.req, -1
        self.gen.idle.append(self)
        self.gen.finish(i, self.status, self.overhead)


class _Generator:
    def __init__(self, host: str, port: int, path: str, body: bytes, n: int) -> None:
        self.host, self.port = host, port
        self.request = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: {AUTH}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.n = n
        self.sched = [0.0] * n
        self.sent = [0.0] * n
        self.done = [0.0] * n
        self.status = [0] * n
        self.overhead = [math.nan] * n
        self.idle: list[_Conn] = []
        self.conns: set[_Conn] = set()
        self.opened_late = 0
        self.opening: set[asyncio.Future[None]] = set()
        self.completed = 0
        self.all_done: asyncio.Future[None] | None = None

    async def open(self) -> _Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
        self.conns.add(conn)
        return conn

    def lost(self, conn: _Conn) -> None:
        self.conns.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)

    def finish(self, i: int, status: int, overhead: float) -> None:
        self.done[i] = time.perf_counter()
        self.status[i] = status
        self.overhead[i] = overhead
        self.completed += 1
        if self.completed == self.n and self.all_done is not None and not self.all_done.done():
            self.all_done.set_result(None)

    async def _open_and_send(self, i: int) -> None:
        try:
            conn = await self.open()
        except OSError:
            self.sent[i] = time.perf_counter()
            self.finish(i, -1, math.nan)
            return
        conn.send(i)

    def _send(self, i: int) -> None:
        if self.idle:
            self.idle.pop().send(i)
        else:
            self.opened_late += 1
            task = asyncio.ensure_future(self._open_and_send(i))
            self.opening.add(task)
            task.add_done_callback(self.opening.discard)

    async def run(self, rate: float, timeout: float = 60) -> None:
        loop = asyncio.get_running_loop()
        self.all_done = loop.create_future()
        self.idle.extend(await asyncio.gather(*(self.open() for _ in range(CONNECTIONS))))
        start = time.perf_counter() + 0.05
        i, n = 0, self.n
        while i < n:
            now = time.perf_counter()
            while i < n and start + i / rate <= now:
                self.sched[i] = start + i / rate
                self._send(i)
                i += 1
            if i < n:
                await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        try:
            await asyncio.wait_for(asyncio.shield(self.all_done), timeout)
        finally:
            for c in list(self.conns):
                if c.transport is not None:
                    c.transport.close()


def _load(host: str, port: int, rate: int, seconds: float, stream: bool) -> dict[str, Any]:
    """One open-loop run; latencies (ms) of the measured (post-warm-up) requests."""
    warm, n = int(rate * WARM_S), int(rate * seconds)
    gen = _Generator(host, port, "/v1/chat/completions", STREAM_BODY if stream else BODY, warm + n)
    gc.collect()
    gc.freeze()
    gc.disable()  # no collector pauses in the generator while it measures
    try:
        run_loop(gen.run(rate))
    finally:
        gc.enable()
        gc.unfreeze()
    ok = [i for i in range(warm, warm + n) if gen.status[i] == 200]
    return {
        "lat": [(gen.done[i] - gen.sched[i]) * 1000 for i in ok],
        "lat_send": [(gen.done[i] - gen.sent[i]) * 1000 for i in ok],
        "send_lag": [(gen.sent[i] - gen.sched[i]) * 1000 for i in range(warm, warm + n)],
        "overhead": [gen.overhead[i] for i in ok if not math.isnan(gen.overhead[i])],
        "errors": n - len(ok),
        "opened_late": gen.opened_late,
        "achieved_rps": n / (gen.sched[-1] - gen.sched[warm]) if n > 1 else float(rate),
    }


def _merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: [] for k in ("lat", "lat_send", "send_lag", "overhead")}
    for r in runs:
        for k in out:
            out[k] += r[k]
    out["errors"] = sum(r["errors"] for r in runs)
    out["opened_late"] = sum(r["opened_late"] for r in runs)
    out["achieved_rps"] = min(r["achieved_rps"] for r in runs)
    return out


def _measure(
    mport: int, pport: int, proxy_pid: int, rate: int, stream: bool, seconds: float, rounds: int, label: str = ""
) -> dict[str, Any]:
    """`rounds` x (direct run, proxied run), alternating so that both meet the same
    conditions; the latencies of a side's rounds are pooled."""
    pre = f"{label}{'stream' if stream else 'plain'}_{rate}rps_"
    out: dict[str, Any] = {}
    ds, ps = [], []
    busy_d: dict[int, float] = {}
    busy_p: dict[int, float] = {}
    cpu_s = wait_s = proxied_s = loop_cpu_s = loop_wait_s = other_cpu_s = 0.0
    for _ in range(rounds):
        c0 = _cpu_times()
        ds.append(_load("127.0.0.1", mport, rate, seconds, stream))
        c1 = _cpu_times()
        cpu0, t0, s0, th0 = _cpu_seconds(proxy_pid), time.monotonic(), _sched(proxy_pid), _thread_times(proxy_pid)
        ps.append(_load("127.0.0.1", pport, rate, seconds, stream))
        proxied_s += time.monotonic() - t0
        cpu_s += _cpu_seconds(proxy_pid) - cpu0
        wait_s += _sched(proxy_pid)[1] - s0[1]  # ready to run, but another task had the CPU
        th1 = _thread_times(proxy_pid)
        # the event loop runs in the main thread (tid = pid); the rest: publisher, librdkafka
        loop_cpu_s += th1[proxy_pid][0] - th0[proxy_pid][0]
        loop_wait_s += th1[proxy_pid][1] - th0[proxy_pid][1]
        other_cpu_s += sum(v[0] - th0[t][0] for t, v in th1.items() if t != proxy_pid and t in th0)
        c2 = _cpu_times()
        for c, v in _busy(c0, c1).items():
            busy_d[c] = busy_d.get(c, 0.0) + v / rounds
        for c, v in _busy(c1, c2).items():
            busy_p[c] = busy_p.get(c, 0.0) + v / rounds
    d, p = _merge(ds), _merge(ps)
    for q in (50, 95, 99):
        dq, pq = _pct(d["lat_send"], q), _pct(p["lat_send"], q)
        dsq, psq = _pct(d["lat"], q), _pct(p["lat"], q)
        out[f"{pre}direct_p{q}_ms"] = round(dq, 3)
        out[f"{pre}proxy_p{q}_ms"] = round(pq, 3)
        out[f"{pre}added_p{q}_ms"] = round(pq - dq, 3)
        out[f"{pre}direct_from_schedule_p{q}_ms"] = round(dsq, 3)
        out[f"{pre}proxy_from_schedule_p{q}_ms"] = round(psq, 3)
        out[f"{pre}added_from_schedule_p{q}_ms"] = round(psq - dsq, 3)
        out[f"{pre}overhead_header_p{q}_ms"] = round(_pct(p["overhead"], q), 3)
    out[f"{pre}direct_max_ms"] = round(max(d["lat_send"], default=math.nan), 3)
    out[f"{pre}proxy_max_ms"] = round(max(p["lat_send"], default=math.nan), 3)
    out[f"{pre}generator_send_lag_p50_ms"] = round(_pct(d["send_lag"] + p["send_lag"], 50), 3)
    out[f"{pre}generator_send_lag_p99_ms"] = round(_pct(d["send_lag"] + p["send_lag"], 99), 3)
    out[f"{pre}proxy_cpu_percent"] = round(cpu_s / proxied_s * 100, 1)
    out[f"{pre}proxy_runqueue_wait_ms_per_s"] = round(wait_s * 1000 / proxied_s, 2)
    out[f"{pre}proxy_loop_thread_cpu_percent"] = round(loop_cpu_s / proxied_s * 100, 1)
    out[f"{pre}proxy_loop_thread_runqueue_wait_ms_per_s"] = round(loop_wait_s * 1000 / proxied_s, 2)
    out[f"{pre}proxy_other_threads_cpu_percent"] = round(other_cpu_s / proxied_s * 100, 1)
    out[f"{pre}achieved_rps"] = round(p["achieved_rps"], 1)
    out[f"{pre}errors"] = d["errors"] + p["errors"]
    out[f"{pre}requests"] = len(p["lat"])
    out[f"{pre}connections_opened_late"] = d["opened_late"] + p["opened_late"]
    for c, v in busy_d.items():
        out[f"{pre}direct_cpu{c}_busy_percent"] = round(v, 1)
    for c, v in busy_p.items():
        out[f"{pre}proxy_cpu{c}_busy_percent"] = round(v, 1)
    out[f"{pre}load_1min"] = round(os.getloadavg()[0], 2)

    def f(k: str) -> str:
        return "/".join(f"{out[f'{pre}{k}_p{q}_ms']:.3f}" for q in (50, 95, 99))

    print(
        f"{pre[:-1]:>15}: added p50/p95/p99 {f('added')} ms (from schedule {f('added_from_schedule')}); "
        f"direct {f('direct')}; header {f('overhead_header')}; proxy CPU {out[pre + 'proxy_cpu_percent']}%, "
        f"(loop thread {out[pre + 'proxy_loop_thread_cpu_percent']}%, others {out[pre + 'proxy_other_threads_cpu_percent']}%), "
        f"run-queue wait {out[pre + 'proxy_runqueue_wait_ms_per_s']} ms/s "
        f"(loop thread {out[pre + 'proxy_loop_thread_runqueue_wait_ms_per_s']}), busy {({c: round(v) for c, v in busy_p.items()})}, "
        f"errors {out[pre + 'errors']}, load {out[pre + 'load_1min']}",
        flush=True,
    )
    return out


def main() -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0, help="measured seconds per run (after 1 s warm-up)")
    ap.add_argument("--rounds", type=int, default=3, help="direct/proxied run pairs per rate and kind")
    ap.add_argument(
        "--unisolated-rounds", type=int, default=2,
        help="with --realtime: then this many rounds at 1,000 requests/s without it (unisolated_* keys; 0 = skip)",
    )  # fmt: skip
    ap.add_argument("--proxy-loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    ap.add_argument(
        "--nice", type=int, default=0,
        help="run every benchmark process at this nice value (e.g. -10, needs root); recorded as `sched_policy`",
    )  # fmt: skip
    ap.add_argument(
        "--realtime", type=int, default=10 if os.geteuid() == 0 else 0, metavar="PRIO",
        help="run every benchmark process under SCHED_FIFO at PRIO (1-99, needs root; default 10 as root, "
        "0 = off), so that other work on a shared machine cannot delay it; recorded as `sched_policy`",
    )  # fmt: skip
    args, _ = ap.parse_known_args(sys.argv[1:])
    ncpu = os.cpu_count() or 1
    proxy_cpus = {ncpu - 1}
    other_cpus = set(range(ncpu - 1)) if ncpu > 1 else proxy_cpus
    out: dict[str, Any] = {
        "seconds_per_run": args.seconds,
        "warmup_seconds_per_run": WARM_S,
        "rounds": args.rounds,
        "cpus": ncpu,
        "load_1min_at_start": round(os.getloadavg()[0], 2),
        "generator": "open loop, raw HTTP/1.1 keep-alive, " + ("uvloop" if uvloop_available() else "asyncio"),
        "added_is": "p(proxied runs) - p(direct runs), latency from request written to last byte read",
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = EmbeddedBroker(0, log_dir=work / "broker").start()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            env = {
                **os.environ,
                "LLMPULSE_KAFKA": f"kafka://{broker.bootstrap}",
                "LLMPULSE_DATA_DIR": str(work / "data"),
                "LLMPULSE_KAFKA__TOPIC_PREFIX": "bench.",
                "LLMPULSE_LOG_LEVEL": "WARNING",
                "LLMPULSE_CONFIG": "",
            }
            from llmpulse.config import load_settings

            ensure_topics(broker.bootstrap, load_settings(None, environ=env).kafka)
            mport, pport = free_port(), free_port()
            if ncpu > 1:
                _pin(os.getpid(), other_cpus)  # children start with the generator's mask
                assert broker.process is not None
                _pin(broker.process.pid, other_cpus)
            mock = subprocess.Popen(
                [sys.executable, "-m", "llmpulse", "mock-upstream", "--port", str(mport)],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            procs.append(mock)
            proxy = subprocess.Popen(
                [sys.executable, "-m", "llmpulse", "proxy", "--port", str(pport), "--loop", args.proxy_loop,
                 "--upstream", f"http://127.0.0.1:{mport}/v1"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            procs.append(proxy)
            if ncpu > 1:
                _pin(proxy.pid, proxy_cpus)
            _wait_http(f"http://127.0.0.1:{mport}/v1/models")
            _wait_http(f"http://127.0.0.1:{pport}/healthz")
            if ncpu > 1:  # again, now that every thread of each exists
                _pin(proxy.pid, proxy_cpus)
                _pin(mock.pid, other_cpus)
                assert broker.process is not None
                _pin(broker.process.pid, other_cpus)
                _pin(os.getpid(), other_cpus)
            pids = [pid for pid in (proxy.pid, mock.pid, os.getpid(), broker.process.pid if broker.process else 0) if pid]
            for pid in pids:
                if args.nice:
                    _renice(pid, args.nice)
                if args.realtime:
                    _realtime(pid, args.realtime)
            out["sched_policy"] = _policy(proxy.pid)
            out["pin_proxy_cpus"] = _affinity(proxy.pid)
            out["pin_mock_cpus"] = _affinity(mock.pid)
            out["pin_broker_cpus"] = _affinity(broker.process.pid) if broker.process else ""
            out["pin_generator_cpus"] = _affinity(os.getpid())
            out["proxy_threads"] = len(os.listdir(f"/proc/{proxy.pid}/task"))
            out["proxy_loop"] = args.proxy_loop if args.proxy_loop != "auto" else (
                "uvloop" if uvloop_available() else "asyncio"
            )
            for stream in (False, True):
                for rate in RATES:
                    out.update(_measure(mport, pport, proxy.pid, rate, stream, args.seconds, args.rounds))
            if args.realtime and args.unisolated_rounds:
                # the same at 1,000 requests/s without SCHED_FIFO: what other work on the
                # machine does to the figures (compare with the load and busy shares)
                for pid in pids:
                    _unrealtime(pid)
                out["unisolated_sched_policy"] = _policy(proxy.pid)
                for stream in (False, True):
                    out.update(
                        _measure(mport, pport, proxy.pid, 1000, stream, args.seconds, args.unisolated_rounds, "unisolated_")
                    )
            out["proxy_rss_mb"] = round(_status_mb(proxy.pid, "VmRSS"), 1)
            out["proxy_peak_rss_mb"] = round(_status_mb(proxy.pid, "VmHWM"), 1)
            health = urllib.request.urlopen(f"http://127.0.0.1:{pport}/healthz", timeout=5).read().decode()
            out["proxy_kafka_up"] = '"kafka_up":true' in health
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            broker.stop()
    out["load_1min_at_end"] = round(os.getloadavg()[0], 2)
    for q in (50, 95, 99):
        out[f"added_p{q}_ms"] = out[f"plain_1000rps_added_p{q}_ms"]
        out[f"added_stream_p{q}_ms"] = out[f"stream_1000rps_added_p{q}_ms"]
    out["proxy_cpu_percent_at_1000rps"] = out["plain_1000rps_proxy_cpu_percent"]
    out["proxy_cpu_percent_at_1000rps_stream"] = out["stream_1000rps_proxy_cpu_percent"]
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(main(), indent=2))
