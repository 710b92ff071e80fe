"""The first vertical slice, end to end: producer -> Kafka -> Faust worker -> ClickHouse -> query."""

from __future__ import annotations

import random
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from llmpulse.analysis.client import query
from llmpulse.config import Settings
from llmpulse.embedded.ports import free_port
from llmpulse.errors import LLMPulseError
from llmpulse.schemas import CallEvent, encode, encode_batch
from tests.kafkatools import produce
from tests.pipeline import Component, settings_from, wait_for, write_config

N = 20_000
MODELS = ["gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet", "llama-3-70b"]


def make_events(t0: datetime) -> list[CallEvent]:
    rng = random.Random(42)
    out = []
    for i in range(N):
        err = rng.random() < 0.08
        out.append(
            CallEvent(
                event_id=f"ev{i:06d}",
                ts=t0 + timedelta(milliseconds=i * 3),  # 60 s of traffic: many 2 s and 10 s windows
                model=MODELS[i % len(MODELS)],
                provider="openai" if i % 4 < 2 else "other",
                app=f"app{i % 3}",
                user=f"user{i % 17}",
                status_code=503 if err else 200,
                error_type="upstream_5xx" if err else None,
                latency_ms=rng.uniform(50, 2000),
                prompt_tokens=rng.randint(1, 500),
                completion_tokens=rng.randint(0, 300),
                cost_usd=0.0001 * (i % 7),
            )
        )
    return out


def truth(events: list[CallEvent], window_s: int) -> dict[tuple[str, int], tuple[int, int, int]]:
    acc: dict[tuple[str, int], list[int]] = {}
    for e in events:
        ms = int(e.ts.timestamp() * 1000)
        start = ms - ms % (window_s * 1000)
        a = acc.setdefault((e.model, start), [0, 0, 0])
        a[0] += 1
        a[1] += int(e.error_type is not None)
        a[2] += e.total_tokens or 0
    return {k: (v[0], v[1], v[2]) for k, v in acc.items()}


def worker_duplicates(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('llmpulse_worker_duplicates_total{kind="calls"}'))  # fmt: skip


@pytest.mark.e2e
def test_slice_counts_every_event_once(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    base = make_settings()
    worker_port = free_port()
    # the replay below comes minutes after its windows closed: recognised within an hour
    config = write_config(tmp_path / "llmpulse.yaml", base, worker__dedup_horizon_s=3600.0, worker__web_port=worker_port)
    settings = settings_from(config)
    sink = Component(config, "sink", log=tmp_path / "sink.log").start()
    worker = Component(config, "worker", log=tmp_path / "worker.log").start()
    bootstrap = settings.kafka.bootstrap_servers()
    topic = settings.kafka.topic("calls")
    try:
        t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
        events = make_events(t0)
        # single events and batch envelopes, with malformed messages among them
        values: list[tuple[bytes | str | None, bytes]] = []
        for i in range(0, N // 2):
            values.append((events[i].model, encode(events[i])))
        for i in range(N // 2, N, 500):
            chunk = events[i : i + 500]
            by_model: dict[str, list[CallEvent]] = {}
            for e in chunk:
                by_model.setdefault(e.model, []).append(e)
            values += [(m, encode_batch(evs)) for m, evs in by_model.items()]
        bad = [
            b"{not json",
            b'{"model": "gpt-4o", "prompt_tokens": "many", "ts": "2026-01-01T00:00:00Z"}',
            b'{"model": "gpt-4o", "prompt_tokens": -5, "ts": "2026-01-01T00:00:00Z"}',
            b'{"prompt_tokens": 5, "ts": "2026-01-01T00:00:00Z"}',
        ]
        for j, b in enumerate(bad):
            values.insert(1000 + j * 3000, ("gpt-4o", b))
        produce(bootstrap, topic, values)

        rows = wait_for(settings, "SELECT count(), uniqExact(event_id) FROM llmpulse.llm_calls FINAL",
                        lambda r: bool(r) and r[0][0] >= N)  # fmt: skip
        assert rows == [[N, N]]

        want10 = truth(events, 10)
        sql10 = (
            "SELECT dimensions['model'], toUnixTimestamp64Milli(window_start), requests, errors, total_tokens "
            "FROM llmpulse.llm_aggregates FINAL WHERE kind = 'calls' AND window_s = 10 AND dims_key LIKE 'model=%'"
        )
        got = wait_for(settings, sql10, lambda r: sum(x[2] for x in r) >= N)
        assert {(m, int(t)): (r, e, tok) for m, t, r, e, tok in got} == want10

        want2 = truth(events, 2)
        sql2 = sql10.replace("window_s = 10", "window_s = 2")
        got2 = wait_for(settings, sql2, lambda r: sum(x[2] for x in r) >= N)
        assert {(m, int(t)): (r, e, tok) for m, t, r, e, tok in got2} == want2
        glob = query(settings, "SELECT sum(requests), sum(errors) FROM llmpulse.llm_aggregates FINAL "
                               "WHERE kind = 'calls' AND window_s = 10 AND dims_key = '*'").rows  # fmt: skip
        assert glob == [[N, sum(1 for e in events if e.error_type)]]

        dead = wait_for(settings, "SELECT reason, payload FROM llmpulse.deadletter FINAL WHERE kind = 'invalid'",
                        lambda r: len(r) >= 4)  # fmt: skip
        reasons = sorted(r[0] for r in dead)
        assert len(dead) == 4, reasons
        assert any("invalid JSON" in r for r in reasons)
        assert any("'prompt_tokens'" in r and "integer" in r for r in reasons)
        assert any("'prompt_tokens'" in r and "greater than or equal to 0" in r for r in reasons)
        assert any("'model'" in r and "missing" in r for r in reasons)
        assert {r[1].encode() for r in dead} == set(bad)

        # a replay of the same events changes nothing; a sentinel tells us it was processed
        produce(bootstrap, topic, values)
        sentinel = CallEvent(event_id="sentinel", ts=datetime.now(UTC), model="sentinel-model")
        produce(bootstrap, topic, [(sentinel.model, encode(sentinel))])
        wait_for(settings, "SELECT count() FROM llmpulse.llm_aggregates FINAL WHERE dims_key = 'model=sentinel-model'",
                 lambda r: bool(r) and r[0][0] >= 2)  # fmt: skip
        assert query(settings, "SELECT count() FROM llmpulse.llm_calls FINAL WHERE model != 'sentinel-model'").rows == [[N]]
        got_after = query(settings, sql10).rows
        assert {(m, int(t)): (r, e, tok) for m, t, r, e, tok in got_after} == want10
        # every replayed event was recognised as a copy by its event_id: dropped, counted, not late
        deadline = time.monotonic() + 60
        while worker_duplicates(worker_port) < N and time.monotonic() < deadline:
            time.sleep(0.5)
        assert worker_duplicates(worker_port) == N
        late = query(settings, "SELECT count() FROM llmpulse.deadletter FINAL WHERE kind = 'late'").rows
        assert late[0][0] == 0

        # the sink's own health on /metrics: INSERT latency and batch sizes per table
        from prometheus_client.parser import text_string_to_metric_families

        from llmpulse.embedded.store import store_owner

        owner = store_owner(settings.data_dir)
        assert owner is not None
        with urllib.request.urlopen(f"{owner['query_url']}/metrics", timeout=10) as resp:
            families = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
        rows_written = {
            s.labels["table"]: s.value for s in families["llmpulse_sink_batch_rows"].samples if s.name.endswith("_sum")
        }
        assert rows_written["llm_calls"] >= N
        inserts = [s for s in families["llmpulse_sink_insert_seconds"].samples if s.name.endswith("_count")]
        assert any(s.labels["table"] == "llm_aggregates" and s.value > 0 for s in inserts)

        # queries are read-only
        for sql in ("INSERT INTO llmpulse.llm_calls (event_id) VALUES ('x')", "DROP TABLE llmpulse.llm_calls",
                    "ALTER TABLE llmpulse.llm_calls DELETE WHERE 1"):  # fmt: skip
            with pytest.raises(LLMPulseError, match="read-only"):
                query(settings, sql)
        cut = query(settings, "SELECT arrayJoin(range(100000)) AS number", max_rows=10)
        assert cut.truncated and len(cut.rows) == 10
    finally:
        worker.stop()
        sink.stop()
    assert "Traceback" not in sink.output(), sink.output()[-3000:]
