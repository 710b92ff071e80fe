"""Chaos: the whole pipeline under load, a seeded schedule of faults, then lost and double counts.

`python bench/run.py chaos [--seed N] [--duration-s S] [--faults F] [--rate R]`

Runs a real Tansu broker, the mock upstream, the proxy, the worker, the sink and the
notifier as subprocesses (`llmpulse ...`, as users run them), the SDK and the HTTP ingest
in this process, and a fake Slack (tests/fake_slack.py) as the notifier's webhook. Three
load threads make calls through the proxy (OpenAI-compatible HTTP), record calls with
the SDK and post batches to the ingest, each call tagged with a unique `user`; what a
producer accepted (HTTP 200 from the proxy, an event returned by `llmpulse.record`, a
202 from the ingest) is the ground truth.

The fault schedule (seeded: `--seed` changes it) spreads `--faults` faults over the
run, one at a time: SIGKILL of the worker, the sink, the notifier or the proxy at a
random moment, each restarted; broker stalls (SIGSTOP) longer than the producers'
delivery timeout; Slack answering 429 with Retry-After, or a storm of 500s; duplicate
deliveries (an accepted ingest batch posted again with the same event ids, SDK messages
produced again); the ClickHouse store unreachable for the sink for 3-6 s (longer than a
batch): the embedded store (chDB) lives inside the sink's process, there is no connection
to cut, so the sink runs with `LLMPULSE_FAULT_STORE_DOWN_FILE` set
(llmpulse/embedded/store.py) and every call of its store client fails like a dropped
connection while the bench holds that file; the sink's own retry, backoff and backpressure
do the rest (`store_down_s`, and `sink_store_down_errors`: the failures its log shows).

One incident is injected as well (seeded start, 30-70 s in): for 45 s the SDK's calls take
6-8 s, so the shipped `latency_avg` rule fires for app `sdk` and resolves afterwards; its
notifications must reach Slack through the Slack faults and notifier kills, each once
(`incident_notified_firing`, `incident_notified_resolved`).

Afterwards (load stopped, producers flushed, windows closed) it compares with the ground
truth: raw rows (`llm_calls FINAL`), the worker's 10 s windows (`llm_aggregates FINAL`,
global and per model), the per-minute roll-ups (`llm_calls_1m`) and the notifications
(each notification id once in Slack). Keys: faults_injected, events_sent, lost_events,
double_counted_raw, double_counted_windows, double_counted_rollups,
notifications_duplicated, seed, and the details beside them: `missing_from_windows`
counts accepted events no window holds (events replayed after their window closed are
counted in a revision of it within `worker.allowed_lateness_s`; only older ones go to the
dead-letter topic as `late`), `lost_by_producer` names where losses came from
(p proxy, s SDK, i ingest). A short run (`--duration-s 70 --faults 16`) validates it; the
issue's bar is >= 50 faults a run (the default: 60 over 240 s).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import common

from llmpulse.analysis.client import query
from llmpulse.embedded.ports import free_port
from llmpulse.errors import LLMPulseError

WEBHOOK_ENV = "LLMPULSE_SECRET_CHAOS_SLACK_WEBHOOK"
DELIVERY_TIMEOUT_S = 3.0
WINDOW_S = 10
INCIDENT_S = 45.0
NOTIFY_RETRY_MAX_S = 5.0  # the notifier's longest retry delay (default 60 s): the run drains within minutes
MODELS = ["gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet"]
KINDS = ["kill_worker", "kill_sink", "kill_notifier", "kill_proxy", "broker_stall",
         "slack_429", "slack_500", "duplicates", "store_down"]  # fmt: skip
NOT_INJECTED: list[str] = []
STORE_DOWN_ENV = "LLMPULSE_FAULT_STORE_DOWN_FILE"  # llmpulse.embedded.store.FAULT_STORE_DOWN_ENV


class Proc:
    """One `llmpulse` subprocess that can be killed and started again."""

    def __init__(self, name: str, config: Path, argv: list[str], workdir: Path, env: dict[str, str]) -> None:
        self.name, self.config, self.argv, self.env = name, config, argv, env
        self.log = workdir / f"{name}.log"
        self.p: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> Proc:
        fh = open(self.log, "ab")  # noqa: SIM115
        self.p = subprocess.Popen([sys.executable, "-m", "llmpulse", "--config", str(self.config), *self.argv],
                                  stdout=fh, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)  # fmt: skip
        fh.close()
        return self

    def kill(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
            self.p.wait(30)
            self.kills += 1

    def stop(self) -> None:
        if self.p is not None:
            common.stop(self.p)


class Truth:
    """What the producers accepted: the tag (`user`) of every call, and its ingest batches."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users: set[str] = set()
        self.ingest_batches: list[bytes] = []
        self.refused = Counter[str]()

    def add(self, users: list[str]) -> None:
        with self.lock:
            self.users.update(users)


def _post(url: str, body: bytes, ctype: str = "application/json", timeout: float = 30) -> int:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype, "Authorization": "Bearer sk-chaos"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0  # refused or reset: the proxy is down; the caller saw an error, nothing accepted


def proxy_load(base: str, truth: Truth, rate: float, stop: threading.Event, rng: random.Random) -> None:
    n = 0
    while not stop.is_set():
        user = f"p-{n}"
        n += 1
        body = json.dumps({"model": rng.choice(MODELS), "user": user,
                           "messages": [{"role": "user", "content": "chaos"}]}).encode()  # fmt: skip
        status = _post(base + "/v1/chat/completions", body)
        if status != 0:  # the proxy answered (the upstream's answer, errors too): it owes Kafka this event
            truth.add([user])
        else:
            truth.refused[f"proxy_{status}"] += 1
        stop.wait(1 / rate)


def sdk_load(truth: Truth, rate: float, stop: threading.Event, rng: random.Random,
             incident: tuple[float, float] = (-1.0, -1.0)) -> None:  # fmt: skip
    """SDK calls; between `incident` (start, end; monotonic) they take 6-8 s: a latency incident of app `sdk`."""
    import llmpulse

    n = 0
    while not stop.is_set():
        user = f"s-{n}"
        n += 1
        err = rng.random() < 0.05
        slow = incident[0] <= time.monotonic() < incident[1]
        latency = rng.uniform(6000, 8000) if slow else rng.uniform(50, 900)
        ev = llmpulse.record(model=rng.choice(MODELS), prompt_tokens=rng.randint(5, 500),
                             completion_tokens=rng.randint(1, 200), latency_ms=latency, user=user,
                             status_code=500 if err else 200, error_type="upstream_5xx" if err else None)  # fmt: skip
        if ev is not None:
            truth.add([user])
        stop.wait(1 / rate)


def ingest_load(url: str, truth: Truth, rate: float, stop: threading.Event, rng: random.Random) -> None:
    n = 0
    while not stop.is_set():
        batch = []
        for _ in range(5):
            batch.append({"event_id": f"chaos-i-{n}", "model": rng.choice(MODELS), "user": f"i-{n}", "app": "ingest",
                          "latency_ms": rng.uniform(50, 900), "prompt_tokens": rng.randint(5, 500),
                          "completion_tokens": rng.randint(1, 200)})  # fmt: skip
            n += 1
        body = json.dumps(batch).encode()
        status = _post(url + "/ingest/calls", body)
        if status == 202:
            truth.add([e["user"] for e in batch])
            with truth.lock:
                truth.ingest_batches.append(body)
        else:
            truth.refused[f"ingest_{status}"] += 1
        stop.wait(5 / rate)


def _schedule(seed: int, duration_s: float, faults: int) -> list[tuple[float, str]]:
    rng = random.Random(seed)
    kinds = [KINDS[i % len(KINDS)] for i in range(faults)]
    rng.shuffle(kinds)
    start, end = 10.0, max(20.0, duration_s - 15.0)
    times = sorted(rng.uniform(start, end) for _ in range(faults))
    return list(zip(times, kinds, strict=True))


def _query(settings: Any, sql: str) -> list[list[Any]]:
    for _ in range(60):
        try:
            return query(settings, sql).rows
        except LLMPulseError:
            time.sleep(1)
    return query(settings, sql).rows


def main() -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--duration-s", type=float, default=240.0)
    ap.add_argument("--faults", type=int, default=60)
    ap.add_argument("--rate", type=float, default=10.0, help="calls/s per producer (proxy, SDK, ingest)")
    args = ap.parse_args()
    import llmpulse
    from llmpulse.producers.ingest import start_ingest_thread
    from tests.fake_slack import FakeSlack

    cal = common.calibration()  # this machine's speed before the run (bench/common.py)
    rng = random.Random(args.seed)
    schedule = _schedule(args.seed, args.duration_s, args.faults)
    # one latency incident (seeded start) early enough to fire and resolve within the run: its
    # notifications are the ones that must reach Slack exactly once through the faults
    incident_at = rng.uniform(30.0, max(30.0, min(70.0, args.duration_s - 170.0)))
    incident: list[float] = [-1.0, -1.0]
    workdir = Path(tempfile.mkdtemp(prefix="llmpulse-chaos-"))
    truth = Truth()
    injected = Counter[str]()
    down_s = 0.0
    fake = FakeSlack().start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMPULSE_")}
    env.update({WEBHOOK_ENV: fake.webhook_url(), "PYTHONUNBUFFERED": "1"})
    procs: dict[str, Proc] = {}
    stop = threading.Event()
    loads: list[threading.Thread] = []
    ingest = None
    with common.broker(workdir) as b:
        assert b.process is not None
        broker_pid = b.process.pid
        proxy_port, mock_port = free_port(), free_port()
        config, settings = common.make_config(
            workdir, b.bootstrap,
            kafka={"partitions": 3, "session_timeout_ms": 6000},
            worker={"windows_s": [WINDOW_S, 60], "grace_s": 3.0, "idle_close_s": 2.0,
                    "dimensions": [[], ["model"], ["app"]]},
            sink={"batch_rows": 2000, "batch_seconds": 0.5},
            proxy={"port": proxy_port, "delivery_timeout_s": DELIVERY_TIMEOUT_S, "broker_retry_s": 0.5,
                   "upstreams": [{"name": "mock", "base_url": f"http://127.0.0.1:{mock_port}/v1"}]},
            sdk={"app": "sdk", "delivery_timeout_s": DELIVERY_TIMEOUT_S, "broker_retry_s": 0.5,
                 "flush_interval_s": 0.1},
            ingest={"delivery_timeout_s": DELIVERY_TIMEOUT_S},
            notify={"receivers": {"slack": {"type": "slack", "webhook_url_env": WEBHOOK_ENV}},
                    "default_receivers": ["slack"], "group_by": ["rule"], "group_wait_s": 1.0,
                    "group_interval_s": 1.0, "retry_initial_s": 0.2, "retry_max_s": NOTIFY_RETRY_MAX_S},
        )  # fmt: skip
        procs["mock"] = Proc("mock", config, ["mock-upstream", "--port", str(mock_port), "--error-rate", "0.05",
                                              "--seed", str(args.seed)], workdir, env)  # fmt: skip
        # the sink alone runs with the store's fault gate: the bench makes its store unreachable
        procs["sink"] = Proc("sink", config, ["sink"], workdir, {**env, STORE_DOWN_ENV: str(workdir / "store-down")})
        procs["worker"] = Proc("worker", config, ["worker"], workdir, env)
        procs["notifier"] = Proc("notifier", config, ["notify"], workdir, env)
        procs["proxy"] = Proc("proxy", config, ["proxy", "--port", str(proxy_port)], workdir, env)
        try:
            for p in procs.values():
                p.start()
            common.wait_sink_ready(settings, timeout=120)
            _wait_http(f"http://127.0.0.1:{proxy_port}/healthz", 60)
            llmpulse.configure(settings)
            ingest = start_ingest_thread(settings, bootstrap=b.bootstrap, port=0, token="")
            _INGEST_URL[:] = [ingest.url]
            loads = [
                threading.Thread(target=proxy_load, args=(f"http://127.0.0.1:{proxy_port}", truth, args.rate, stop,
                                                          random.Random(args.seed + 1)), daemon=True),
                threading.Thread(target=sdk_load, args=(truth, args.rate, stop, random.Random(args.seed + 2),
                                                        incident), daemon=True),
                threading.Thread(target=ingest_load, args=(ingest.url, truth, args.rate, stop,
                                                           random.Random(args.seed + 3)), daemon=True),
            ]  # fmt: skip
            t0 = time.monotonic()
            incident[:] = [t0 + incident_at, t0 + incident_at + INCIDENT_S]
            for t in loads:
                t.start()
            for at, kind in schedule:
                while time.monotonic() - t0 < at:
                    time.sleep(0.05)
                down_s += _inject(kind, procs, broker_pid, fake, truth, settings, b.bootstrap, rng, workdir)
                injected[kind] += 1
            while time.monotonic() - t0 < args.duration_s:
                time.sleep(0.2)
            stop.set()
            for t in loads:
                t.join(60)
            load_s = time.monotonic() - t0
            llmpulse.flush(60)
            sent = len(truth.users)
            print(f"load stopped after {load_s:.0f} s: {sent} events accepted, {sum(injected.values())} faults; settling")
            raw = _settle(settings, truth, timeout=300)
            _drain_notifications(fake, timeout=240)
            figures = _compare(settings, truth, raw, fake)
            figures.update(_incident_notified(fake, incident_at, args.duration_s))
        finally:
            stop.set()
            if ingest is not None:
                ingest.stop()
            with contextlib.suppress(Exception):
                os.kill(broker_pid, signal.SIGCONT)
            for name in ("proxy", "notifier", "worker", "sink", "mock"):
                if name in procs:
                    procs[name].stop()
            fake.stop()
    return {
        "seed": args.seed,
        "duration_s": args.duration_s,
        "faults_injected": sum(injected.values()),
        "faults_by_kind": dict(sorted(injected.items())),
        "faults_not_injected": NOT_INJECTED,
        "events_sent": len(truth.users),
        "refused_by_producers": dict(truth.refused),
        **figures,
        "kills": {name: p.kills for name, p in procs.items()},
        "store_down_s": round(down_s, 1),
        "sink_store_down_errors": _store_down_errors(workdir / "sink.log"),
        "workdir": str(workdir),
        **cal,
    }


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer")


def _store_down_errors(log: Path) -> int:
    """The sink's log lines of calls failed by the store-down fault (its INSERT retries among them)."""
    with contextlib.suppress(OSError):
        return sum("fault injected" in line for line in log.read_text(errors="replace").splitlines())
    return 0


def _inject(kind: str, procs: dict[str, Proc], broker_pid: int, fake: Any, truth: Truth, settings: Any,
            bootstrap: str, rng: random.Random, workdir: Path) -> float:  # fmt: skip
    """Inject one fault; returns how long the store was unreachable (store_down), else 0."""
    if kind == "store_down":
        # also while a sink restarted by a kill just before is starting: it waits for the store
        # (migrate.open_migrated_waiting; it used to exit at its first migration statement)
        flag = workdir / "store-down"
        down = rng.uniform(3.0, 6.0)  # several batches (batch_seconds 0.5) fail and are retried
        flag.touch()
        try:
            time.sleep(down)
        finally:
            flag.unlink()
        return down
    if kind.startswith("kill_"):
        p = procs[kind.removeprefix("kill_")]
        p.kill()
        time.sleep(rng.uniform(0.0, 1.0))
        p.start()
    elif kind == "broker_stall":
        os.kill(broker_pid, signal.SIGSTOP)
        try:
            time.sleep(DELIVERY_TIMEOUT_S + rng.uniform(1.0, 3.0))  # longer than the delivery timeout
        finally:
            os.kill(broker_pid, signal.SIGCONT)
    elif kind == "slack_429":
        fake.fail_next(429, times=rng.randint(1, 4), retry_after=1)
    elif kind == "slack_500":
        fake.fail_next(500, times=rng.randint(5, 15))
    elif kind == "duplicates":
        with truth.lock:
            batches = list(truth.ingest_batches[-3:])
        ingest_url = None
        for b in batches:  # the same events again, same event ids: a producer retrying
            ingest_url = ingest_url or _ingest_url()
            if ingest_url:
                _post(ingest_url + "/ingest/calls", b)
        _duplicate_sdk(settings, bootstrap)
    return 0.0


_INGEST_URL: list[str] = []


def _ingest_url() -> str | None:
    return _INGEST_URL[0] if _INGEST_URL else None


def _duplicate_sdk(settings: Any, bootstrap: str) -> None:
    """Produce the last SDK messages of the calls topic again, as a producer resending does."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    topic = settings.kafka.topic("calls")
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"chaos-dup-{time.monotonic_ns()}", "log_level": 0,
                  "enable.auto.commit": False})  # fmt: skip
    values: list[tuple[bytes | None, bytes]] = []
    try:
        c.assign([TopicPartition(topic, i, 0) for i in range(settings.kafka.partitions)])
        for m in c.consume(500, 2.0):
            if m.error() is None and m.value() and b'"source":"sdk"' in m.value():
                values.append((m.key(), m.value()))
    finally:
        c.close()
    if values:
        p = Producer({"bootstrap.servers": bootstrap, "log_level": 0})
        for key, value in values[-5:]:
            p.produce(topic, value=value, key=key)
        p.flush(10)


def _settle(settings: Any, truth: Truth, timeout: float) -> dict[str, tuple[str, int, str, str, int]]:
    """Wait until the store holds every accepted call (or `timeout`) and windows had time to close."""
    deadline = time.monotonic() + timeout
    want = len(truth.users)
    raw: dict[str, tuple[str, int, str, str, int]] = {}
    have, changed = -1, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - changed < 60:  # until all, or 60 s without news
        raw = _raw(settings)
        got = len(set(raw) & truth.users)
        if got >= want:
            break
        if got != have:
            have, changed = got, time.monotonic()
        time.sleep(3)
    time.sleep(WINDOW_S + 3 + 2 + 5)  # the last window's end + grace + idle close + the sink's batch
    return _raw(settings)


def _incident_headers(fake: Any) -> list[str]:
    """The headers of the Slack messages about the injected incident (rule `latency_avg`)."""
    return [m.header for m in fake.snapshot() if "latency_avg" in m.header + m.body_text]


def _drain_notifications(fake: Any, timeout: float) -> None:
    """Wait until the notifier has nothing left to retry: the incident's resolution reached Slack
    and no attempt came for twice the longest retry delay (the faults stopped with the load;
    Slack failures still queued are used up by the retries first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = any("resolved" in h for h in _incident_headers(fake))
        last = max((a.at for a in fake.attempts), default=0.0)
        if done and time.monotonic() - last > 2 * NOTIFY_RETRY_MAX_S:
            return
        time.sleep(1)


def _incident_notified(fake: Any, at: float, duration_s: float) -> dict[str, Any]:
    """Whether the injected latency incident reached Slack: firing, then resolved (rule `latency_avg`)."""
    heads = _incident_headers(fake)
    return {
        "incident": f"latency of app sdk 6-8 s from {at:.0f} s for {INCIDENT_S:.0f} s",
        "incident_notified_firing": any("firing" in h for h in heads),
        # resolving takes the incident's last window, then `resolve_after` clear windows (about 3 min)
        "incident_notified_resolved": any("resolved" in h for h in heads) if duration_s >= 200 else None,
        "incident_notifications": len(heads),
    }


def _raw(settings: Any) -> dict[str, tuple[str, int, str, str, int]]:
    rows = _query(settings, "SELECT user, count(), any(event_id), any(model), "
                            "toUnixTimestamp64Milli(any(ts)) FROM llmpulse.llm_calls FINAL GROUP BY user")  # fmt: skip
    return {str(u): (str(eid), int(n), str(m), "", int(ts)) for u, n, eid, m, ts in rows}


def _compare(settings: Any, truth: Truth, raw: dict[str, tuple[str, int, str, str, int]], fake: Any) -> dict[str, Any]:
    lost = truth.users - set(raw)
    double_raw = sum(n - 1 for _eid, n, *_ in raw.values() if n > 1)
    # windows and roll-ups against the raw rows of the accepted calls (their event time and model)
    rows = _query(settings, "SELECT toUnixTimestamp64Milli(ts), model, app, status_code >= 400 OR error_type != '' "
                            "FROM llmpulse.llm_calls FINAL")  # fmt: skip
    want_w: Counter[tuple[int, str]] = Counter()
    want_m: Counter[tuple[int, str, str]] = Counter()
    for ts, model, app, _err in rows:
        start = int(ts) // 1000 // WINDOW_S * WINDOW_S
        want_w[(start, "")] += 1
        want_w[(start, str(model))] += 1
        want_m[(int(ts) // 1000 // 60 * 60, str(model), str(app))] += 1
    got_w: Counter[tuple[int, str]] = Counter()
    for start, dims, n in _query(settings, f"SELECT toUnixTimestamp(window_start), dimensions, requests "
                                           f"FROM llmpulse.llm_aggregates FINAL WHERE kind = 'calls' AND "
                                           f"window_s = {WINDOW_S}"):  # fmt: skip
        d = dict(dims)
        if not d:
            got_w[(int(start), "")] += int(n)
        elif list(d) == ["model"]:
            got_w[(int(start), str(d["model"]))] += int(n)
    got_m = Counter({(int(b), str(m), str(a)): int(n) for b, m, a, n in _query(
        settings, "SELECT toUnixTimestamp(bucket), model, app, countMerge(requests) FROM llmpulse.llm_calls_1m "
                  "GROUP BY bucket, model, app")})  # fmt: skip
    msgs = fake.snapshot()
    ids = Counter(m.notification_id for m in msgs if m.notification_id)
    alerts = _query(settings, "SELECT count(), uniqExact(alert_id) FROM llmpulse.alerts FINAL")[0]
    return {
        "lost_events": len(lost),
        "lost_sample": sorted(lost)[:10],
        "lost_by_producer": dict(Counter(u.split("-")[0] for u in lost)),
        "double_counted_raw": double_raw,
        "double_counted_windows": sum(max(0, got_w[k] - want_w[k]) for k in got_w),
        "missing_from_windows": sum(max(0, want_w[k] - got_w[k]) for k in want_w),
        "windows_compared": len(want_w),
        "double_counted_rollups": sum(max(0, got_m[k] - want_m[k]) for k in got_m),
        "missing_from_rollups": sum(max(0, want_m[k] - got_m[k]) for k in want_m),
        "notifications": len(msgs),
        "notifications_duplicated": sum(n - 1 for n in ids.values() if n > 1),
        "alerts_rows": int(alerts[0]),
        "alerts_duplicated": int(alerts[0]) - int(alerts[1]),
        "slack_attempts": len(fake.attempts),
    }


if __name__ == "__main__":  # pragma: no cover - run through bench/run.py
    print(json.dumps(main(), indent=2))
    sys.exit(0)
