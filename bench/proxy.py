"""Latency the proxy adds: the mock upstream called directly vs through the proxy.

Open-loop load at fixed rates (500 and 1,000 requests/s), non-streamed and streamed
(16-token streams, read to the end). The mock upstream and the proxy run as
subprocesses (`llmpulse mock-upstream`, `llmpulse proxy`) publishing to a real
embedded broker; the proxy is pinned to one CPU when the machine has more than one.
Added latency at percentile p = p(proxied) - p(direct). Also reported: the proxy's
own `x-llmpulse-overhead-ms` header, its CPU (percent of one core) and RSS.

    python bench/run.py proxy [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from llmpulse.embedded.broker import EmbeddedBroker
from llmpulse.embedded.ports import free_port
from llmpulse.kafka.topics import ensure_topics

RATES = (500, 1000)
BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say something about latency."}]}'
STREAM_BODY = BODY[:-1] + b',"stream":true}'
HEADERS = {"Authorization": "Bearer sk-bench-not-a-real-key", "Content-Type": "application/json"}


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


async def _load(url: str, rate: int, seconds: float, stream: bool) -> dict[str, Any]:
    """Fire `rate` requests/s for `seconds` (open loop); latencies of the completed ones."""
    body = STREAM_BODY if stream else BODY
    lat: list[float] = []
    overhead: list[float] = []
    errors = 0
    conn = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=conn) as http:

        async def one() -> None:
            nonlocal errors
            t = time.perf_counter()
            try:
                async with http.post(url, data=body, headers=HEADERS) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                        return
                    h = r.headers.get("x-llmpulse-overhead-ms")
                    if h is not None:
                        overhead.append(float(h))
            except aiohttp.ClientError:
                errors += 1
                return
            lat.append((time.perf_counter() - t) * 1000)

        # warm the connection pool at a low rate first
        await asyncio.gather(*(one() for _ in range(50)))
        lat.clear()
        overhead.clear()
        n = int(rate * seconds)
        tasks = []
        start = time.perf_counter()
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one()))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return {"lat": lat, "overhead": overhead, "errors": errors, "achieved_rps": n / wall, "wall_s": wall}


def main() -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    args, _ = ap.parse_known_args(sys.argv[1:])
    ncpu = os.cpu_count() or 1
    out: dict[str, Any] = {"seconds_per_phase": args.seconds, "cpus": ncpu}
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
            mock = subprocess.Popen(
                [sys.executable, "-m", "llmpulse", "mock-upstream", "--port", str(mport)],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            procs.append(mock)
            proxy = subprocess.Popen(
                [sys.executable, "-m", "llmpulse", "proxy", "--port", str(pport),
                 "--upstream", f"http://127.0.0.1:{mport}/v1"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            procs.append(proxy)
            if ncpu > 1:  # the proxy alone on the last CPU; the rest elsewhere
                os.sched_setaffinity(proxy.pid, {ncpu - 1})
                others = set(range(ncpu - 1))
                os.sched_setaffinity(mock.pid, others)
                if broker.process is not None:
                    os.sched_setaffinity(broker.process.pid, others)
                os.sched_setaffinity(0, others)
            _wait_http(f"http://127.0.0.1:{mport}/v1/models")
            _wait_http(f"http://127.0.0.1:{pport}/healthz")
            direct_url = f"http://127.0.0.1:{mport}/v1/chat/completions"
            proxy_url = f"http://127.0.0.1:{pport}/v1/chat/completions"
            for stream in (False, True):
                kind = "stream" if stream else "plain"
                for rate in RATES:
                    d = asyncio.run(_load(direct_url, rate, args.seconds, stream))
                    cpu0, t0 = _cpu_seconds(proxy.pid), time.monotonic()
                    p = asyncio.run(_load(proxy_url, rate, args.seconds, stream))
                    cpu = (_cpu_seconds(proxy.pid) - cpu0) / (time.monotonic() - t0) * 100
                    pre = f"{kind}_{rate}rps_"
                    for q in (50, 95, 99):
                        out[f"{pre}direct_p{q}_ms"] = round(_pct(d["lat"], q), 3)
                        out[f"{pre}proxy_p{q}_ms"] = round(_pct(p["lat"], q), 3)
                        out[f"{pre}added_p{q}_ms"] = round(_pct(p["lat"], q) - _pct(d["lat"], q), 3)
                        out[f"{pre}overhead_header_p{q}_ms"] = round(_pct(p["overhead"], q), 3)
                    out[f"{pre}proxy_cpu_percent"] = round(cpu, 1)
                    out[f"{pre}achieved_rps"] = round(p["achieved_rps"], 1)
                    out[f"{pre}errors"] = d["errors"] + p["errors"]
                    out[f"{pre}requests"] = len(p["lat"])
                    print(
                        f"{kind:6} {rate:5} rps: added p50 {out[pre + 'added_p50_ms']:.3f} ms, "
                        f"p95 {out[pre + 'added_p95_ms']:.3f}, p99 {out[pre + 'added_p99_ms']:.3f}; "
                        f"proxy CPU {cpu:.0f}%, errors {out[pre + 'errors']}",
                        flush=True,
                    )
            out["proxy_rss_mb"] = round(_rss_mb(proxy.pid), 1)
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
    for q in (50, 95, 99):
        out[f"added_p{q}_ms"] = out[f"plain_1000rps_added_p{q}_ms"]
        out[f"added_stream_p{q}_ms"] = out[f"stream_1000rps_added_p{q}_ms"]
    out["proxy_cpu_percent_at_1000rps"] = out["plain_1000rps_proxy_cpu_percent"]
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(main(), indent=2))
