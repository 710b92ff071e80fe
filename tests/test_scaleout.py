"""Scale-out: three workers and two sinks share the partitions; SIGKILLs lose and double nothing.

Three `llmpulse worker` processes (Faust group `<prefix>worker`) and two `llmpulse sink`
processes (group `<prefix>sink`) run against the session broker while 200,000 call
events flow on 6 partitions. Mid-stream one worker and one sink are killed with
SIGKILL and a new worker joins. Then:

- the raw rows, counted distinct by event_id, are exactly the events sent;
- every closed window (2 s and 10 s, per model and global) holds exactly the ground truth;
- the rule's alerts are exactly those the rules engine gives for the true windows, each
  published once on the alerts topic.

The embedded chDB store admits one process, so each sink writes its own store (its own
data directory): the union of the two stores is what one ClickHouse server would hold
with both sinks writing to it. Rows a killed sink inserted but had not committed are
re-delivered to the survivor and so sit in both stores: the union is taken by event id
(raw rows) and by window key (aggregates), as ReplacingMergeTree does on one server, and
duplicated windows must agree in every figure.
"""

from __future__ import annotations

import json
import os
import random
import time
import zlib
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from llmpulse.analysis.client import query
from llmpulse.config import Settings
from llmpulse.embedded.store import store_owner
from llmpulse.errors import LLMPulseError
from llmpulse.schemas import Alert, CallEvent, encode_batch
from llmpulse.schemas.codec import decode
from tests.kafkatools import read_messages
from tests.pipeline import Component, settings_from, write_config
from tests.rules_helpers import Runner, calls, engine

N = 200_000
PARTITIONS = 6
SPAN_S = 120  # event time covered by the stream
CHUNK = 600  # events per time slice; each slice is sent as one batch envelope per model
BURST_MODEL_INDEX = 3
BURST = (50, 70)  # seconds after t0: every call of the burst model fails
RULES = """\
version: 1
rules:
  - name: burst_errors
    type: threshold
    kind: calls
    metric: error_rate
    direction: above
    warning: 0.3
    critical: 0.6
    window: 10
    by: [model]
    match: {{model: {model}}}
    min_requests: 20
    resolve_after: 2
"""


def pick_models() -> list[str]:
    """Two models per partition (librdkafka's default partitioner: CRC32 of the key)."""
    per: dict[int, list[str]] = {p: [] for p in range(PARTITIONS)}
    i = 0
    while any(len(v) < 2 for v in per.values()):
        name = f"model-{i}"
        p = zlib.crc32(name.encode()) % PARTITIONS
        if len(per[p]) < 2:
            per[p].append(name)
        i += 1
    return [m for p in range(PARTITIONS) for m in per[p]]


def make_events(t0: datetime, models: list[str]) -> list[CallEvent]:
    rng = random.Random(9)
    burst_model = models[BURST_MODEL_INDEX]
    step_ms = SPAN_S * 1000 / N
    out = []
    for i in range(N):
        ts = t0 + timedelta(milliseconds=int(i * step_ms))
        model = models[i % len(models)]
        offset_s = (ts - t0).total_seconds()
        err = (model == burst_model and BURST[0] <= offset_s < BURST[1]) or rng.random() < 0.02
        out.append(
            CallEvent(
                event_id=f"so{i:07d}", ts=ts, model=model, provider="openai", app=f"app{i % 3}",
                user=f"u{i % 11}", status_code=503 if err else 200, error_type="upstream_5xx" if err else None,
                latency_ms=rng.uniform(20, 900), prompt_tokens=rng.randint(1, 400),
                completion_tokens=rng.randint(0, 200),
            )
        )  # fmt: skip
    return out


def truth(events: list[CallEvent], window_s: int) -> dict[tuple[str, int], tuple[int, int, int]]:
    """(model or '*', window start ms) -> (requests, errors, total tokens)."""
    acc: dict[tuple[str, int], list[int]] = {}
    for e in events:
        ms = int(e.ts.timestamp() * 1000)
        start = ms - ms % (window_s * 1000)
        for dim in (e.model, "*"):
            a = acc.setdefault((dim, start), [0, 0, 0])
            a[0] += 1
            a[1] += int(e.error_type is not None)
            a[2] += e.total_tokens or 0
    return {k: (v[0], v[1], v[2]) for k, v in acc.items()}


def expected_alerts(events: list[CallEvent], model: str) -> Counter[tuple[str, str, str, int]]:
    """What the rules engine says for the burst model's true 10 s windows, in window order."""
    t = truth([e for e in events if e.model == model], 10)
    runner = Runner(engine(RULES.format(model=model), (2, 10)))
    for (_, start), (req, err, _tok) in sorted(t.items(), key=lambda kv: kv[0][1]):
        begin = datetime.fromtimestamp(start / 1000, UTC)
        runner.feed(calls(0, req, err, window=10, dims={"model": model}, start=begin))
    return Counter((a.fingerprint, a.state, a.severity, int(a.window_start.timestamp() * 1000)) for a in runner.alerts)


class Pacer:
    """Sends time slices as batch envelopes keyed by model, at a steady rate, recording partitions."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "batch.size": 1_000_000, "log_level": 3})
        self.partitions: dict[str, set[int]] = {}
        self.failed: list[str] = []

    def _done(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failed.append(str(err))
        else:
            self.partitions.setdefault(msg.key().decode(), set()).add(msg.partition())

    def send(self, events: list[CallEvent]) -> None:
        by_model: dict[str, list[CallEvent]] = {}
        for e in events:
            by_model.setdefault(e.model, []).append(e)
        for model, evs in by_model.items():
            while True:
                try:
                    self.producer.produce(self.topic, key=model.encode(), value=encode_batch(evs), on_delivery=self._done)
                    break
                except BufferError:
                    self.producer.poll(0.05)
        self.producer.poll(0)

    def flush(self) -> None:
        assert self.producer.flush(60) == 0


def wait_owner(settings: Settings, comp: Component, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        owner = store_owner(settings.data_dir)
        if owner and owner.get("query_url"):
            return
        assert comp.proc is not None and comp.proc.poll() is None, comp.output()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"sink did not start: {comp.output()[-3000:]}")


def rows_of(settings: Settings, sql: str) -> list[list[Any]]:
    return query(settings, sql, max_rows=1_000_000).rows


AGG_SQL = (
    "SELECT window_s, if(dims_key = '*', '*', dimensions['model']), toUnixTimestamp64Milli(window_start), "
    "revision, requests, errors, total_tokens, latency_p95_ms, toString(cost_usd) "
    "FROM llmpulse.llm_aggregates FINAL WHERE kind = 'calls' AND (dims_key = '*' OR dims_key LIKE 'model=%')"
)


def union_aggregates(stores: list[Settings]) -> dict[tuple[int, str, int], tuple[Any, ...]]:
    """Both stores' windows by key; a window in both must agree (highest revision wins, as in the table)."""
    out: dict[tuple[int, str, int], tuple[Any, ...]] = {}
    for s in stores:
        for w, dim, start, rev, *figures in rows_of(s, AGG_SQL):
            key = (int(w), str(dim), int(start))
            have = out.get(key)
            if have is None or rev > have[0]:
                out[key] = (rev, *figures)
            elif rev == have[0]:
                assert tuple(figures) == have[1:], f"window {key} differs between the stores: {figures} vs {have[1:]}"
    return out


def closed_totals(aggs: dict[tuple[int, str, int], tuple[Any, ...]], window_s: int) -> dict[tuple[str, int], tuple[int, int, int]]:
    return {(dim, start): (int(v[1]), int(v[2]), int(v[3])) for (w, dim, start), v in aggs.items() if w == window_s}


def window_diff(
    size: int, got: dict[tuple[str, int], tuple[int, int, int]], want: dict[tuple[str, int], tuple[int, int, int]],
    stores: list[Settings],
) -> str:
    """What differs, with the dead letters by kind: enough to tell a late event from a lost one."""
    missing = sorted(k for k in want if k not in got)
    wrong = sorted((k, got[k], want[k]) for k in want if k in got and got[k] != want[k])
    extra = sorted(k for k in got if k not in want)
    dead: list[list[Any]] = []
    for s in stores:
        try:
            dead += rows_of(s, "SELECT kind, count() FROM llmpulse.deadletter FINAL GROUP BY kind")
        except LLMPulseError as exc:
            dead.append(["unreadable", str(exc)])
    return (
        f"{size} s windows: {len(missing)} missing {missing[:5]}, {len(wrong)} wrong "
        f"{wrong[:8]}, {len(extra)} extra {extra[:5]}; lost requests "
        f"{sum(v[0] for v in want.values()) - sum(v[0] for v in got.values())}"
        f"; dead letters by kind: {dead}"
    )


def dump_topics(bootstrap: str, topics: list[str], path: Path) -> None:
    """On a failure: the topics as JSON lines (topic, partition, offset, key, value), to debug from."""
    with path.open("w") as fh:
        for topic in topics:
            for m in read_messages(bootstrap, topic, timeout=20, until=lambda out: False):
                value = m.value()
                fh.write(json.dumps({
                    "topic": topic, "p": m.partition(), "o": m.offset(), "ts": m.timestamp()[1],
                    "key": m.key().decode(errors="replace") if m.key() else None,
                    "value": value.decode(errors="replace") if value is not None else None,
                }) + "\n")  # fmt: skip


def union_ids(stores: list[Settings]) -> tuple[set[str], int]:
    ids: set[str] = set()
    rows = 0
    for s in stores:
        got = [r[0] for r in rows_of(s, "SELECT event_id FROM llmpulse.llm_calls")]
        rows += len(got)
        ids.update(got)
    return ids, rows


@pytest.mark.e2e
@pytest.mark.timeout(420)
def test_three_workers_two_sinks_survive_sigkill(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    models = pick_models()
    burst_model = models[BURST_MODEL_INDEX]
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.format(model=burst_model))
    base = make_settings(**{"kafka.partitions": PARTITIONS})
    common: dict[str, Any] = {
        "rules_file": str(rules),
        # idle closing skips partitions with a backlog, so even SCALEOUT_IDLE_S=2 holds; the
        # default keeps CI clear of a starved 2-core moment that stalls a partition for seconds
        "worker__idle_close_s": float(os.environ.get("SCALEOUT_IDLE_S", "20")),
        "worker__batch_max_messages": 200,
        "sink__batch_seconds": 0.3,
        "clickhouse__query_max_rows": 1_000_000,
    }
    cfg_a = write_config(tmp_path / "a.yaml", base, data_dir=str(tmp_path / "store-a"), **common)
    cfg_b = write_config(tmp_path / "b.yaml", base, data_dir=str(tmp_path / "store-b"), **common)
    sa, sb = settings_from(cfg_a), settings_from(cfg_b)
    assert sa.kafka.partitions == PARTITIONS
    bootstrap = sa.kafka.bootstrap_servers()

    sinks = [Component(cfg_a, "sink", log=tmp_path / "sink-a.log").start(),
             Component(cfg_b, "sink", log=tmp_path / "sink-b.log").start()]  # fmt: skip
    workers = [Component(cfg_a, "worker", log=tmp_path / f"worker-{i}.log").start() for i in range(3)]
    everything = [*sinks, *workers]
    try:
        wait_owner(sa, sinks[0])
        wait_owner(sb, sinks[1])
        t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
        t0 -= timedelta(seconds=t0.second % 10)
        events = make_events(t0, models)
        pacer = Pacer(bootstrap, sa.kafka.topic("calls"))
        slices = [events[i : i + CHUNK] for i in range(0, N, CHUNK)]
        rate = 6000.0  # events/s while the group changes under it
        started = time.monotonic()
        for n, chunk in enumerate(slices):
            frac = n / len(slices)
            if workers[0].proc is not None and workers[0].proc.poll() is None and frac >= 0.2:
                workers[0].kill()
            if len(workers) == 3 and frac >= 0.6:
                workers.append(Component(cfg_a, "worker", log=tmp_path / "worker-3.log").start())
                everything.append(workers[-1])
            if sinks[1].proc is not None and sinks[1].proc.poll() is None and frac >= 0.4:
                sinks[1].kill()
            pacer.send(chunk)
            ahead = started + (n + 1) * CHUNK / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        pacer.flush()
        assert not pacer.failed, pacer.failed[:3]
        assert {p for ps in pacer.partitions.values() for p in ps} == set(range(PARTITIONS))
        assert workers[0].proc is not None and workers[0].proc.returncode == -9
        assert sinks[1].proc is not None and sinks[1].proc.returncode == -9

        want2, want10 = truth(events, 2), truth(events, 10)
        stores = [sa, sb]
        deadline = time.monotonic() + 200
        aggs: dict[tuple[int, str, int], tuple[Any, ...]] = {}
        while time.monotonic() < deadline:
            try:
                aggs = union_aggregates(stores)
            except LLMPulseError:
                aggs = {}
            g2 = sum(v[1] for (w, d, _), v in aggs.items() if w == 2 and d == "*")
            g10 = sum(v[1] for (w, d, _), v in aggs.items() if w == 10 and d == "*")
            if g2 >= N and g10 >= N:
                break
            for c in (*workers[1:], sinks[0]):
                assert c.proc is not None and c.proc.poll() is None, c.output()[-3000:]
            time.sleep(1.0)
        for size, want in ((10, want10), (2, want2)):
            got_totals = closed_totals(aggs, size)
            if got_totals != want:
                dump_topics(bootstrap, [sa.kafka.topic("partials"), sa.kafka.topic("calls")], tmp_path / "topics.jsonl")
                raise AssertionError(window_diff(size, got_totals, want, stores))
        republished = sorted(k for k, v in aggs.items() if v[0] != 1)
        if republished:
            dump_topics(bootstrap, [sa.kafka.topic("partials")], tmp_path / "topics.jsonl")
        assert not republished, f"windows published with a revision above 1: {republished[:5]}"

        want_alerts = expected_alerts(events, burst_model)
        assert want_alerts, "the burst must make the rule fire"
        alerts_topic = sa.kafka.topic("alerts")
        msgs = read_messages(bootstrap, alerts_topic, expect=sum(want_alerts.values()), timeout=60, quiet_s=5.0)
        got: Counter[tuple[str, str, str, int]] = Counter()
        for m in msgs:
            for a in decode(m.value(), Alert).valid:
                got[(a.fingerprint, a.state, a.severity, int(a.window_start.timestamp() * 1000))] += 1
        assert got == want_alerts

        # raw rows: the surviving sink flushes on SIGTERM; then both stores are read directly
        assert sinks[0].stop() == 0, sinks[0].output()[-3000:]
        ids, rows = union_ids(stores)
        assert len(ids) == N and ids == {e.event_id for e in events}
        assert rows >= N
        dead = sum(int(rows_of(s, "SELECT count() FROM llmpulse.deadletter FINAL")[0][0]) for s in stores)
        assert dead == 0, "no event may be late or invalid"
    finally:
        for c in everything:
            c.stop()
    for c in everything:
        assert "Traceback" not in c.output(), c.output()[-3000:]
    print(json.dumps({"sink_rows_total": rows, "distinct_events": len(ids)}))
