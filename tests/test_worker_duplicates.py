"""Every event counted once by its event_id: copies at new offsets are dropped, not counted or called late.

The unit tests hold the dedup structure (llmpulse/streams/dedup.py) and the windows to
their bounds, horizon and persisted state without Kafka. The end-to-end test produces the
same events again at new offsets through the real broker to the real `llmpulse worker`:
in the same consumer batch (back to back, and twice in one envelope), in later batches
while their window is open, after their window closed (within the horizon) and after a
SIGKILL and restart; the windows must equal the ground truth and
`llmpulse_worker_duplicates_total` the number of copies.
"""

from __future__ import annotations

import json
import random
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from llmpulse.config import Settings
from llmpulse.embedded.ports import free_port
from llmpulse.schemas import CallEvent, Feedback, GpuSample, encode, encode_batch
from llmpulse.schemas.host import HostSample
from llmpulse.streams import window_state as WS
from llmpulse.streams.accumulators import NANO
from llmpulse.streams.changelog_state import record_value
from llmpulse.streams.dedup import SeenIds, chunk_key_parse, chunk_key_text
from llmpulse.streams.windowing import Partial, PartitionWindows
from tests.kafkatools import produce, read_messages
from tests.pipeline import Component, settings_from, write_config
from tests.test_worker_e2e import MODELS, latest_aggregates

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T0_MS = int(T0.timestamp() * 1000)
DIMS = [[], ["model"]]


def call(i: int, sec: float, model: str = "m1") -> CallEvent:
    return CallEvent(
        event_id=f"e{i}", ts=T0 + timedelta(seconds=sec), model=model, status_code=500 if i % 4 == 0 else 200,
        error_type="upstream_5xx" if i % 4 == 0 else None, latency_ms=10 + i % 7,
        prompt_tokens=i % 11, completion_tokens=3, cost_usd=0.0001 * (i % 5),
    )  # fmt: skip


def windows(horizon_s: float = 30.0, grace: float = 1.0) -> PartitionWindows:
    return PartitionWindows("calls", "calls:0", [10, 60], grace, 5.0, DIMS, horizon_s)


def totals(partials: list[Partial], window_s: int = 10) -> dict[tuple[int, str], tuple[int, int, int, int]]:
    out: dict[tuple[int, str], tuple[int, int, int, int]] = {}
    for p in partials:
        if p.window_s == window_s:
            s = p.state
            out[(p.start_ms, p.dims_key)] = (s["r"], s["e"], s["tt"], s["cn"])
    return out


def truth(events: list[CallEvent], window_s: int = 10) -> dict[tuple[int, str], tuple[int, int, int, int]]:
    acc: dict[tuple[int, str], list[int]] = {}
    for e in events:
        ms = int(e.ts.timestamp() * 1000)
        start = ms - ms % (window_s * 1000)
        for dk in ("*", f"model={e.model}"):
            a = acc.setdefault((start, dk), [0, 0, 0, 0])
            a[0] += 1
            a[1] += int(e.error_type is not None)
            a[2] += e.total_tokens or 0
            a[3] += round((e.cost_usd or 0) * NANO)
    return {k: (v[0], v[1], v[2], v[3]) for k, v in acc.items()}


# -- the structure ---------------------------------------------------------------------------------
def test_copies_in_the_same_batch_later_batches_and_closed_windows_are_dropped_not_late() -> None:
    w = windows(horizon_s=30.0, grace=1.0)
    events = [call(i, i * 0.25, model=f"m{i % 2}") for i in range(80)]  # 0 .. 20 s
    first = [(pos, e) for pos, e in enumerate(events[:40])]  # 0 .. 10 s
    # the same batch: every 5th event twice in a row, at new positions
    batch: list[tuple[int, CallEvent]] = []
    pos = 0
    for e in events[:40]:
        batch.append((pos, e))
        pos += 1
        if int(e.event_id[1:]) % 5 == 0:
            batch.append((pos, e))
            pos += 1
    res = w.apply(batch, now_wall=0)
    assert (res.duplicates, res.late) == (8, [])
    # a later batch: copies of open-window events, then new events that close [0, 10)
    res = w.apply([(pos + i, e) for i, (_, e) in enumerate(first[20:30])], now_wall=0)
    pos += 10
    assert res.duplicates == 10
    res = w.apply([(pos + i, e) for i, e in enumerate(events[40:])], now_wall=0)
    pos += 40
    assert res.duplicates == 0
    closed = w.close(now_wall=0)
    assert [p.start_ms for p in closed.partials if p.window_s == 10 and p.dims_key == "*"] == [T0_MS]
    # copies of the closed window's events: duplicates, not late; a new event there is late
    copies = [(pos + i, e) for i, (_, e) in enumerate(first)]
    pos += len(copies)
    res = w.apply([*copies, (pos, call(999, 3.0))], now_wall=0)
    pos += 1
    assert res.duplicates == 40 and [x.event.event_id for x in res.late] == ["e999"]
    rest = w.close(now_wall=0, force=True).partials
    assert totals(closed.partials + rest) == truth(events)


def test_a_copy_past_the_horizon_is_late_and_memory_is_bounded() -> None:
    w = windows(horizon_s=20.0, grace=0.0)
    pos = 0
    held: list[int] = []
    for second in range(0, 600, 2):  # 10 minutes of event time, 5 events a second
        batch = [(pos + j, call(second * 10 + j, second + j * 0.2)) for j in range(10)]
        pos += 10
        w.apply(batch, now_wall=0)
        w.close(now_wall=0)
        held.append(len(w.seen))
    # what is held: the open window and the horizon's closed ones, never the whole stream
    assert max(held) <= 5 * (10 + 20 + 10) and len(w.seen.closed) <= 3
    assert all(a.typecode == "q" for a in w.seen.closed.values())  # closed windows: 8 bytes an id
    # an event of 3 minutes ago, sent again: its window is past the horizon, so it is late
    old = call(50 * 10, 50.0)
    res = w.apply([(pos, old)], now_wall=0)
    assert res.duplicates == 0 and len(res.late) == 1
    # one of 10 s ago (within the horizon): a duplicate
    recent = call(590 * 10, 590.0)
    res = w.apply([(pos + 1, recent)], now_wall=0)
    assert res.duplicates == 1 and res.late == []


def test_eviction_returns_the_persisted_chunks_to_delete() -> None:
    s = SeenIds(base_ms=10_000, horizon_ms=20_000)
    ids, added = s.open_window(0)
    ids.add(hash("a"))
    added.append("a")
    assert s.take_added(7) == [((0, 7), "a")]
    ids, added = s.open_window(0)
    ids.add(hash("b"))
    added.append("b")
    assert s.take_added(9) == [((0, 9), "b")]
    assert s.close_through(10_000) == [] and s.seen_closed(0, hash("b"))
    assert s.close_through(29_999) == []  # the window ended 19.999 s before the mark
    assert s.close_through(30_000) == [(0, 7), (0, 9)] and not s.seen_closed(0, hash("a"))
    assert len(s) == 0 and s.chunks == {}
    assert chunk_key_parse(chunk_key_text((-10_000, 123))) == (-10_000, 123)


def persist(w: PartitionWindows, state: dict[str, Any], meta: bool = True) -> None:
    """What the worker writes for a batch (window_state.write_batch: accumulators, late ones, id chunks,
    meta last); meta=False: a crash before the batch's last record reached the changelog."""
    batch: dict[str, Any] = {}
    WS.write_batch(batch, 0, w)
    if not meta:
        del batch[WS.meta_key(0, w.kind)]
    state.update((key, json.loads(record_value(value))) for key, value in batch.items())  # as restore reads it


def restore(state: dict[str, Any], horizon_s: float = 30.0) -> tuple[PartitionWindows, list[Any]]:
    """What a restarted worker reads back (window_state.load); the id chunks it drops."""
    w = windows(horizon_s)
    dropped = [WS.parse(k) for k in WS.load(w, 0, state.items())]
    return w, [d.chunk for d in dropped if d is not None]


def test_persisted_ids_round_trip_and_a_crash_mid_persist_replays_exactly() -> None:
    events = [call(i, i * 0.5, model=f"m{i % 3}") for i in range(60)]  # 0 .. 30 s
    b1 = [(i, e) for i, e in enumerate(events[:30])]
    # batch 2: the rest, with copies of batch 1 (later batch) and of itself (same batch)
    b2: list[tuple[int, CallEvent]] = []
    for e in events[30:]:
        b2.append((30 + len(b2), e))
        if int(e.event_id[1:]) % 3 == 0:
            b2.append((30 + len(b2), e))
    b2 += [(30 + len(b2) + j, e) for j, (_, e) in enumerate(b1[:10])]
    copies = 10 + sum(1 for e in events[30:] if int(e.event_id[1:]) % 3 == 0)
    w = windows()
    state: dict[str, Any] = {}
    w.apply(b1, now_wall=0)
    persist(w, state)
    # round trip: the restored structure holds exactly the ids counted
    r, dropped = restore(dict(state))
    assert dropped == [] and {s: set(v) for s, v in r.seen.open.items()} == {s: set(v) for s, v in w.seen.open.items()}
    res = w.apply(b2, now_wall=0)
    assert res.duplicates == copies
    # a crash after the accumulators and id chunks of batch 2 were written, before its meta
    crashed = dict(state)
    persist(w, crashed, meta=False)
    r, dropped = restore(crashed)
    assert dropped and all(t > r.applied_offset for _, t in dropped)  # batch 2's chunks: replayed
    res = r.apply(b1 + b2, now_wall=0)  # redelivered from the committed offset
    assert res.duplicates == copies
    assert totals(r.close(now_wall=0, force=True).partials) == truth(events)
    # and when only some accumulators of batch 2 reached the changelog
    partial_crash = dict(state)
    w2 = windows()
    w2.apply(b1, now_wall=0)
    persist(w2, {})
    w2.apply(b2, now_wall=0)
    dirty = sorted(w2.take_dirty())
    for key in dirty[: len(dirty) // 2]:
        partial_crash[WS.acc_key(0, "calls", key)] = w2.acc_state(key)
    for chunk, ids in w2.seen.take_added(w2.applied_offset):
        partial_crash[WS.ids_key(0, "calls", chunk)] = ids
    r, _ = restore(partial_crash)
    r.apply(b2, now_wall=0)
    assert totals(r.close(now_wall=0, force=True).partials) == truth(events)


def test_gpu_host_samples_and_feedback_are_deduplicated_by_their_ids() -> None:
    g = PartitionWindows("gpu", "gpu:0", [10], 1.0, 5.0, [["host", "gpu"]])
    s = GpuSample(event_id="s1", ts=T0, host="h", gpu_index=0, utilization_gpu_pct=50.0)
    assert g.apply([(0, s), (1, s), (2, s.model_copy(update={"event_id": "s2"}))], now_wall=0).duplicates == 1
    f = PartitionWindows("feedback", "feedback:0", [10], 1.0, 5.0, [[]])
    fb = Feedback(event_id="f1", call_event_id="c1", ts=T0, relevance=4.0)
    assert f.apply([(0, fb), (1, fb)], now_wall=0).duplicates == 1
    assert [p.state["n"] for p in f.close(now_wall=0, force=True).partials] == [1]
    h = PartitionWindows("host", "host:0", [10], 1.0, 5.0, [["host"]])
    hs = HostSample(event_id="h1", ts=T0, host="h", cpu_pct=10.0, memory_used_bytes=1, memory_total_bytes=2,
                    memory_used_pct=50.0)  # fmt: skip
    assert h.apply([(0, hs), (1, hs)], now_wall=0).duplicates == 1


# -- end to end: the real broker and `llmpulse worker` ------------------------------------------------
def scrape_duplicates(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
        if line.startswith('llmpulse_worker_duplicates_total{kind="calls"}')
    )  # fmt: skip


def window_figures(latest: dict[str, Any], window_s: int, data_end: float) -> dict[tuple[str, str], tuple[Any, ...]]:
    out = {}
    for a in latest.values():
        if (
            a["kind"] == "calls" and a["window_s"] == window_s and (a["dims_key"] == "*" or a["dims_key"].startswith("model="))
            and datetime.fromisoformat(a["window_start"]).timestamp() <= data_end
        ):  # fmt: skip
            out[(a["dims_key"], a["window_start"])] = (a["requests"], a["errors"], a["total_tokens"], a["cost_usd"])
    return out


def window_truth(events: list[CallEvent], window_s: int) -> dict[tuple[str, str], tuple[Any, ...]]:
    acc: dict[tuple[str, str], list[int]] = {}
    for e in events:
        ms = int(e.ts.timestamp() * 1000)
        start = datetime.fromtimestamp((ms - ms % (window_s * 1000)) / 1000, tz=UTC).isoformat().replace("+00:00", "Z")
        for dk in ("*", f"model={e.model}"):
            a = acc.setdefault((dk, start), [0, 0, 0, 0])
            a[0] += 1
            a[1] += int(e.error_type is not None)
            a[2] += e.total_tokens or 0
            a[3] += round((e.cost_usd or 0) * NANO)
    return {k: (v[0], v[1], v[2], v[3] / NANO) for k, v in acc.items()}


@pytest.mark.e2e
def test_events_produced_again_at_new_offsets_count_once(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    port = free_port()
    # the sentinels below are older than the allowed lateness (else they would revise their window):
    # they may be applied before the closers move the mark, under phase B's mark (t0 + 55 s)
    config = write_config(tmp_path / "llmpulse.yaml", make_settings(), worker__grace_s=5.0, worker__idle_close_s=120.0,
                          worker__web_port=port, worker__allowed_lateness_s=10.0)  # fmt: skip
    settings = settings_from(config)
    bootstrap = settings.kafka.bootstrap_servers()
    topic = settings.kafka.topic("calls")
    rng = random.Random(15)
    now = int(datetime.now(UTC).timestamp())
    t0 = datetime.fromtimestamp(now - now % 60 - 600, tz=UTC)  # on a minute: phases fill whole windows
    events = [
        CallEvent(event_id=f"d{i}", ts=t0 + timedelta(milliseconds=i * 25), model=MODELS[rng.randrange(5)],
                  status_code=500 if i % 9 == 0 else 200, error_type="upstream_5xx" if i % 9 == 0 else None,
                  prompt_tokens=i % 40, completion_tokens=5, latency_ms=20 + i % 30, cost_usd=0.00001 * (i % 13))
        for i in range(3200)
    ]  # fmt: skip: 80 s of event time
    phase_a, phase_b, phase_c = events[:1200], events[1200:2400], events[2400:]  # 0-30 s, 30-60 s, 60-80 s
    data_end = events[-1].ts.timestamp()

    def one_per_message(evs: list[CallEvent], copy_every: int = 0) -> tuple[list[tuple[str, bytes]], int]:
        """One event a message (as users' producers send); every `copy_every`-th also again right after it."""
        out, copies = [], 0
        for i, e in enumerate(evs):
            out.append((e.model, encode(e)))
            if copy_every and i % copy_every == 0:
                out.append((e.model, encode(e)))
                copies += 1
        return out, copies

    worker = Component(config, "worker", log=tmp_path / "w1.log").start()
    try:
        # the same consumer batch: copies right behind their originals, and twice in one envelope
        msgs, copies = one_per_message(phase_a, copy_every=7)
        twice = phase_a[3::97]
        msgs += [(e.model, encode_batch([e, e])) for e in twice]  # the original again, and a copy
        copies += 2 * len(twice)
        # later batches, their window still open (event time has not passed it)
        later, _ = one_per_message(phase_a[-200:])
        produce(bootstrap, topic, msgs)
        produce(bootstrap, topic, later)
        copies += len(later)
        produce(bootstrap, topic, one_per_message(phase_b)[0])
        # after their window closed (within the horizon): wait until phase A's windows are published
        start_b = phase_b[0].ts.timestamp()
        latest_aggregates(bootstrap, settings.kafka.topic("aggregates"), timeout=120,
                          until=lambda lat: window_figures(lat, 10, start_b - 1) == window_truth(phase_a, 10))  # fmt: skip
        closed_copies, _ = one_per_message(phase_a[::3])
        produce(bootstrap, topic, closed_copies)
        copies += len(closed_copies)
        deadline = time.monotonic() + 60
        while scrape_duplicates(port) < copies and time.monotonic() < deadline:
            time.sleep(0.5)
        assert scrape_duplicates(port) == copies
        # a crash, then copies of what the killed worker counted: its restored state knows them
        worker.kill()
        again, _ = one_per_message(phase_b[::2])
        rest, rest_copies = one_per_message(phase_c, copy_every=5)
        produce(bootstrap, topic, again + rest)
        # a new event in a window closed longer ago than the allowed lateness is late; one per
        # model, behind every copy of its partition
        sentinels = [CallEvent(event_id=f"late-{m}", ts=t0 + timedelta(seconds=1), model=m) for m in MODELS]
        closers = [CallEvent(event_id=f"close-{m}", ts=events[-1].ts + timedelta(seconds=120), model=m) for m in MODELS]
        produce(bootstrap, topic, [(e.model, encode(e)) for e in sentinels + closers])
        worker = Component(config, "worker", log=tmp_path / "w2.log").start()
        # read until every window of both sizes is in, per model too: the global windows alone
        # (as this waited for before) can be read before the per-model ones of the same window,
        # which sit on other partitions of the topic (CI under load: 2 of 48 not read yet)
        latest = latest_aggregates(
            bootstrap, settings.kafka.topic("aggregates"), timeout=180,
            until=lambda lat: window_figures(lat, 2, data_end) == window_truth(events, 2)
            and window_figures(lat, 10, data_end) == window_truth(events, 10),
        )  # fmt: skip
        assert window_figures(latest, 2, data_end) == window_truth(events, 2)
        assert window_figures(latest, 10, data_end) == window_truth(events, 10)
        dead = read_messages(bootstrap, settings.kafka.topic("deadletter"), timeout=60,
                             until=lambda ms: sum(b"late-m-" in m.value() for m in ms) >= len(MODELS))  # fmt: skip
        late = [json.loads(json.loads(m.value())["payload"])["event_id"] for m in dead if json.loads(m.value())["kind"] == "late"]
        assert sorted(late) == sorted(e.event_id for e in sentinels)
        # the restarted worker counted at least the copies produced while it was down
        assert scrape_duplicates(port) >= len(again) + rest_copies
    finally:
        worker.stop()
