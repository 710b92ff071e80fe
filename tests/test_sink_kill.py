"""The headline test of the ClickHouse sink: SIGKILL at random points, every event exactly once.

100,000 calls flow into Kafka while `llmpulse sink` (a real subprocess) is killed with
SIGKILL at random moments at least 10 times and restarted each time. Afterwards
llm_calls holds each event once and the per-minute and per-hour roll-ups (filled by
materialized views on every INSERT) equal the ground truth computed here.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from llmpulse.analysis.client import query
from llmpulse.config import Settings
from llmpulse.embedded.store import store_owner
from llmpulse.errors import LLMPulseError
from llmpulse.schemas import CallEvent, encode_batch
from tests.kafkatools import produce
from tests.pipeline import Component, settings_from, wait_for, write_config

N = 100_000
PER_MESSAGE = 50
KILLS = 10
MODELS = ["gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet", "llama-3-70b"]


def make_events(t0: datetime) -> list[CallEvent]:
    rng = random.Random(7)
    out = []
    for i in range(N):
        err = rng.random() < 0.05
        out.append(
            CallEvent(
                event_id=f"k{i:07d}",
                ts=t0 + timedelta(milliseconds=i * 3),  # 300 s: several minute buckets
                model=MODELS[i % len(MODELS)],
                provider="openai",
                app=f"app{i % 3}",
                status_code=500 if err else 200,
                error_type="upstream_5xx" if err else None,
                latency_ms=rng.uniform(10, 3000),
                prompt_tokens=rng.randint(1, 500),
                completion_tokens=rng.randint(0, 300),
                cost_usd=None if i % 97 == 0 else round(rng.uniform(0, 0.01), 6),
            )
        )
    return out


def nano(x: float | None) -> int:
    return 0 if x is None else round(x * 1e9)


def truth(events: list[CallEvent]) -> dict[tuple[int, str, str], tuple[int, int, int, int]]:
    acc: dict[tuple[int, str, str], list[int]] = {}
    for e in events:
        minute = int(e.ts.timestamp()) // 60 * 60
        a = acc.setdefault((minute, e.model, e.app), [0, 0, 0, 0])
        a[0] += 1
        a[1] += int(e.is_error)
        a[2] += e.total_tokens or 0
        a[3] += nano(e.cost_usd)
    return {k: (v[0], v[1], v[2], v[3]) for k, v in acc.items()}


ROLLUP_SQL = (
    "SELECT toUnixTimestamp(bucket), model, app, countMerge(requests), sumMerge(errors), sumMerge(tokens_total), "
    "toInt64(sumMerge(cost) * 1000000000) FROM llmpulse.llm_calls_1m GROUP BY bucket, model, app"
)


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_sigkill_at_random_points_counts_every_event_once(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    base = make_settings()
    config = write_config(tmp_path / "llmpulse.yaml", base, sink__batch_rows=1_000, sink__batch_seconds=0.3,
                          sink__instance_id="sink-0")
    settings = settings_from(config)
    bootstrap = settings.kafka.bootstrap_servers()
    topic = settings.kafka.topic("calls")
    t0 = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=10)
    events = make_events(t0)
    values: list[tuple[bytes | str | None, bytes]] = [
        (events[i].model, encode_batch(events[i : i + PER_MESSAGE])) for i in range(0, N, PER_MESSAGE)
    ]
    rng = random.Random()
    log = tmp_path / "sink.log"

    # events keep flowing while the sink is killed: 20 slices over the kills
    done = threading.Event()

    def producer() -> None:
        slices = 40  # about 50 s of traffic, spanning all the kills
        step = len(values) // slices
        for i in range(0, len(values), step):
            produce(bootstrap, topic, values[i : i + step])
            time.sleep(1.2)
        done.set()

    def ready(c: Component) -> bool:
        owner = store_owner(settings.data_dir)  # never open the store ourselves while a sink starts
        return bool(owner and owner.get("query_url") and c.proc is not None and owner.get("pid") == c.proc.pid)

    def count() -> int:
        if not ready(sink):
            return -1
        try:
            return int(query(settings, "SELECT count() FROM llmpulse.llm_calls").rows[0][0])
        except LLMPulseError:
            return -1

    feeder = threading.Thread(target=producer, daemon=True)
    kills = 0
    sink = Component(config, "sink", log=log).start()
    feeder.start()
    try:
        while kills < KILLS:
            # wait until this sink is writing, then kill it at a random point of its work:
            # decoding, recording a batch, inside an INSERT, between INSERT and commit
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (before := count()) < 0:
                time.sleep(0.05)
            while time.monotonic() < deadline and not (count() > before or (done.is_set() and before >= N)):
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.25))
            sink.kill()
            kills += 1
            sink = Component(config, "sink", log=log).start()
        feeder.join(120)
        assert done.is_set()
        deadline = time.monotonic() + 60
        while not ready(sink) and time.monotonic() < deadline:
            time.sleep(0.1)
        rows = wait_for(settings, "SELECT count() FROM llmpulse.llm_calls FINAL", lambda r: bool(r) and r[0][0] >= N,
                        timeout=240)  # fmt: skip
        assert rows == [[N]], sink.output()[-6000:]
    finally:
        rc = sink.stop()
    out = sink.output()
    assert rc == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]

    # the store is closed now: query it directly
    got = query(settings, "SELECT count(), uniqExact(event_id) FROM llmpulse.llm_calls").rows
    assert got == [[N, N]]  # no duplicate row at all, even before merges
    want = truth(events)
    rollup = {(int(b), m, a): (int(r), int(e), int(t), int(c)) for b, m, a, r, e, t, c in query(settings, ROLLUP_SQL).rows}
    assert rollup == want
    hourly = query(settings, "SELECT countMerge(requests), sumMerge(errors), sumMerge(tokens_total), "
                             "toInt64(sumMerge(cost) * 1000000000) FROM llmpulse.llm_calls_1h").rows  # fmt: skip
    totals = [sum(v[i] for v in want.values()) for i in range(4)]
    assert [list(map(int, hourly[0]))] == [totals]
    print(f"kills={kills}, restarts that rebuilt recorded batches: {out.count('rebuilding')}")
