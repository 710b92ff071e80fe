"""Events replayed after their window closed are counted in it: the stored window is revised.

Through the real broker, `llmpulse worker` and `llmpulse sink` to ClickHouse: events
fill some windows, newer events carry every partition's event time past them (the
windows close and are stored at revision 1), then events of those windows arrive, as a
proxy's spool replays them after a broker stall, with copies among them. Within
`worker.allowed_lateness_s` they are counted once each: `llm_aggregates FINAL` must equal
the ground truth of every event for those windows, at every window size, globally and per
model. An event older than the allowed lateness goes to the dead-letter topic as late.
"""

from __future__ import annotations

import random
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from llmpulse.analysis.client import query
from llmpulse.config import Settings
from llmpulse.embedded.ports import free_port
from llmpulse.schemas import CallEvent, encode
from tests.kafkatools import produce
from tests.pipeline import Component, settings_from, wait_for, write_config

MODELS = ["m-a", "m-b", "m-c", "m-d", "m-e"]
Figures = dict[tuple[int, str, int], tuple[int, int, int]]  # (window_s, dims_key, start ms) -> figures

SQL = (
    "SELECT window_s, dims_key, toUnixTimestamp64Milli(window_start), requests, errors, total_tokens "
    "FROM llmpulse.llm_aggregates FINAL WHERE kind = 'calls' AND (dims_key = '*' OR dims_key LIKE 'model=%') "
    "AND window_start >= fromUnixTimestamp64Milli({lo}) AND window_start < fromUnixTimestamp64Milli({hi})"
)


def truth(events: list[CallEvent], sizes: tuple[int, ...]) -> Figures:
    acc: dict[tuple[int, str, int], list[int]] = {}
    for e in events:
        ms = int(e.ts.timestamp() * 1000)
        for s in sizes:
            start = ms - ms % (s * 1000)
            for dk in ("*", f"model={e.model}"):
                a = acc.setdefault((s, dk, start), [0, 0, 0])
                a[0] += 1
                a[1] += int(e.error_type is not None)
                a[2] += e.total_tokens or 0
    return {k: (v[0], v[1], v[2]) for k, v in acc.items()}


def stored(settings: Settings, lo: int, hi: int, ok: Callable[[Figures], bool], timeout: float) -> Figures:
    def figures(rows: list[list[Any]]) -> Figures:
        return {(int(s), str(dk), int(t)): (int(r), int(e), int(tok)) for s, dk, t, r, e, tok in rows}

    rows = wait_for(settings, SQL.format(lo=lo, hi=hi), lambda r: ok(figures(r)), timeout=timeout)
    return figures(rows)


def worker_counter(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(f'{name}{{kind="calls"}}'))


@pytest.mark.e2e
def test_events_after_their_window_closed_revise_the_stored_window(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    port = free_port()
    # no idle closing during the test: the windows close because event time moves past them
    config = write_config(tmp_path / "llmpulse.yaml", make_settings(), worker__grace_s=5.0, worker__idle_close_s=120.0,
                          worker__web_port=port)  # fmt: skip
    settings = settings_from(config)
    assert settings.worker.allowed_lateness_s == 900  # the default under test
    bootstrap = settings.kafka.bootstrap_servers()
    topic = settings.kafka.topic("calls")
    rng = random.Random(16)
    now = int(datetime.now(UTC).timestamp())
    t0 = datetime.fromtimestamp(now - now % 60 - 600, tz=UTC)  # on a minute, 10 minutes ago
    lo, hi = int(t0.timestamp() * 1000), int(t0.timestamp() * 1000) + 20_000

    def make(prefix: str, n: int, first_s: float, span_s: float) -> list[CallEvent]:
        return [
            CallEvent(event_id=f"{prefix}{i}", ts=t0 + timedelta(seconds=first_s + span_s * i / n), model=MODELS[i % 5],
                      status_code=500 if i % 7 == 0 else 200, error_type="upstream_5xx" if i % 7 == 0 else None,
                      prompt_tokens=rng.randrange(1, 50), completion_tokens=5, latency_ms=20 + i % 30)
            for i in range(n)
        ]  # fmt: skip

    on_time = make("a", 1000, 0.0, 20.0)  # windows [t0, t0 + 20 s): 10 of 2 s, 2 of 10 s
    # later traffic on every model's partition: event time passes t0 + 20 s + grace everywhere
    later = make("b", 500, 40.0, 20.0)
    # the replay: events of the closed windows, seconds later, with copies among them
    replayed = make("r", 300, 0.5, 19.0)
    copies = replayed[::4]
    too_old = [CallEvent(event_id=f"old-{m}", ts=t0 - timedelta(minutes=20), model=m) for m in MODELS]
    sizes = (2, 10)

    sink = Component(config, "sink", log=tmp_path / "sink.log").start()
    worker = Component(config, "worker", log=tmp_path / "worker.log").start()
    try:
        produce(bootstrap, topic, [(e.model, encode(e)) for e in on_time + later])
        want_first = truth(on_time, sizes)
        got = stored(settings, lo, hi, lambda f: f == want_first, timeout=180)
        assert got == want_first  # closed and stored (revision 1) before the replay
        revisions = query(settings, f"SELECT max(revision) FROM llmpulse.llm_aggregates FINAL WHERE kind = 'calls' "
                                    f"AND window_start < fromUnixTimestamp64Milli({hi})").rows  # fmt: skip
        assert revisions == [[1]]

        # one event a message, copies right behind their originals and again in a later message
        msgs = []
        for i, e in enumerate(replayed):
            msgs.append((e.model, encode(e)))
            if i % 4 == 0:
                msgs.append((e.model, encode(e)))
        produce(bootstrap, topic, msgs)
        produce(bootstrap, topic, [(e.model, encode(e)) for e in copies] + [(e.model, encode(e)) for e in too_old])

        want = truth(on_time + replayed, sizes)
        got = stored(settings, lo, hi, lambda f: f == want, timeout=180)
        assert got == want
        deadline = time.monotonic() + 60
        while worker_counter(port, "llmpulse_worker_duplicates_total") < 2 * len(copies) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert worker_counter(port, "llmpulse_worker_late_events_total") == len(replayed)
        assert worker_counter(port, "llmpulse_worker_duplicates_total") == 2 * len(copies)
        # published again with a higher revision, which the rules (revision 1 only) never judge twice
        revised = query(settings, f"SELECT min(revision) FROM llmpulse.llm_aggregates FINAL WHERE kind = 'calls' "
                                  f"AND window_start >= fromUnixTimestamp64Milli({lo}) "
                                  f"AND window_start < fromUnixTimestamp64Milli({hi})").rows  # fmt: skip
        assert revised[0][0] >= 2
        # older than the allowed lateness: a dead letter that says so, never counted
        dead = wait_for(settings, "SELECT reason, payload FROM llmpulse.deadletter FINAL WHERE kind = 'late'",
                        lambda r: len(r) >= len(too_old), timeout=120)  # fmt: skip
        assert sorted(p for _, p in dead if '"old-' in p) == sorted(p for _, p in dead)
        assert len(dead) == len(too_old) and all("allowed lateness (900 s" in r for r, _ in dead)
        assert stored(settings, lo, hi, lambda f: True, timeout=1) == want
    finally:
        worker.stop()
        sink.stop()
