"""Allowed lateness: an event that arrives after its window closed is counted in a revision of it.

In memory (no Kafka): a partition's windows (llmpulse/streams/windowing.py) put a late
event within `allowed_lateness_s` into a late accumulator and emit, at the next close,
a cumulative partial of source `<source>~late`; the finalizer merges it and publishes
the window again with a higher revision. Copies of a late event count once; events
older than the allowed lateness are reported late (dead letters); a restore in the
middle (before the late partial went out, or before the batch's meta) counts once.
The end-to-end test through the real broker and worker is in test_worker_late.py.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from llmpulse.config import ConfigError, load_settings
from llmpulse.schemas import CallEvent
from llmpulse.streams import window_state as WS
from llmpulse.streams.finalizing import RETAIN_MS, Finalizer
from llmpulse.streams.windowing import LATE_SUFFIX, Partial, PartitionWindows
from tests.test_worker_duplicates import DIMS, T0, T0_MS, call, persist


def windows(lateness_s: float = 120.0, horizon_s: float = 120.0, source: str = "calls:0") -> PartitionWindows:
    return PartitionWindows("calls", source, [10, 60], 1.0, 5.0, DIMS, horizon_s, lateness_s)


class Stage2:
    """The finalizer as the worker drives it: partials, then the partition's close mark."""

    def __init__(self, sources: list[str]) -> None:
        self.fin = Finalizer({"calls": sources})
        self.published: dict[tuple[int, int, str], list[Any]] = {}

    def feed(self, source: str, partials: list[Partial], mark: int | None) -> None:
        for p in partials:
            assert self.fin.add_partial(p) is not None  # never past the finalizer's retention
        self.fin.set_mark("calls", source, mark)
        for key, agg in self.fin.ready():
            self.published.setdefault((key[1], key[2], key[3]), []).append(agg)
        self.fin.expired()

    def latest(self, window_s: int, start_ms: int, dk: str = "*") -> Any:
        return self.published[(window_s, start_ms, dk)][-1]


def requests_by_model(events: list[CallEvent]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in events:
        out[e.model] = out.get(e.model, 0) + 1
    return out


def test_a_late_event_within_the_lateness_revises_its_windows() -> None:
    w = windows()
    on_time = [call(i, i * 0.5, model=f"m{i % 2}") for i in range(40)]  # 0 .. 20 s
    w.apply(list(enumerate(on_time)), now_wall=0)
    w.apply([(40, call(40, 75.0))], now_wall=0)  # event time 75 s: [0, 10), [10, 20) and [0, 60) close
    stage2 = Stage2(["calls:0"])
    closed = w.close(now_wall=0)
    assert all(p.source == "calls:0" for p in closed.partials)
    stage2.feed("calls:0", closed.partials, closed.mark_ms)
    assert stage2.latest(10, T0_MS).requests == 20 and stage2.latest(10, T0_MS).revision == 1
    assert stage2.latest(60, T0_MS).requests == 40
    # replayed seconds later: events of the closed window [0, 10), one per model
    late = [call(100, 3.0, "m0"), call(101, 4.0, "m1"), call(102, 9.5, "m1")]
    res = w.apply([(41 + i, e) for i, e in enumerate(late)], now_wall=0)
    assert (res.late, res.revised, res.duplicates) == ([], 3, 0)
    out = w.close(now_wall=0)
    late_parts = [p for p in out.partials if p.source == "calls:0" + LATE_SUFFIX]
    # each window size the events fall in, each dimension set, nothing else
    assert sorted((p.window_s, p.start_ms, p.dims_key, p.state["r"]) for p in late_parts) == [
        (10, T0_MS, "*", 3), (10, T0_MS, "model=m0", 1), (10, T0_MS, "model=m1", 2),
        (60, T0_MS, "*", 3), (60, T0_MS, "model=m0", 1), (60, T0_MS, "model=m1", 2),
    ]  # fmt: skip
    stage2.feed("calls:0", out.partials, out.mark_ms)
    g10 = stage2.latest(10, T0_MS)
    assert (g10.requests, g10.revision) == (23, 2)
    assert stage2.latest(10, T0_MS, "model=m1").requests == requests_by_model(on_time[:20] + late)["m1"]
    assert (stage2.latest(60, T0_MS).requests, stage2.latest(60, T0_MS).revision) == (43, 2)
    assert stage2.latest(10, T0_MS + 10_000).revision == 1  # an untouched window is not published again
    # the late source is not waited for: windows keep closing on the partition's own mark
    assert stage2.fin.complete_through("calls") == out.mark_ms


def test_late_partials_are_cumulative_and_copies_of_late_events_count_once() -> None:
    w = windows()
    w.apply([(0, call(0, 1.0)), (1, call(1, 30.0))], now_wall=0)
    stage2 = Stage2(["calls:0"])
    first = w.close(now_wall=0)
    stage2.feed("calls:0", first.partials, first.mark_ms)
    a, b = call(10, 2.0), call(11, 3.0)
    # a late event and its copy in the same batch
    res = w.apply([(2, a), (3, a)], now_wall=0)
    assert (res.revised, res.duplicates) == (1, 1)
    out = w.close(now_wall=0)
    stage2.feed("calls:0", out.partials, out.mark_ms)
    assert stage2.latest(10, T0_MS).requests == 2
    # later: another late event and a copy of the first one (already emitted)
    res = w.apply([(4, a), (5, b)], now_wall=0)
    assert (res.revised, res.duplicates) == (1, 1)
    out = w.close(now_wall=0)
    [late10] = [p for p in out.partials if p.source.endswith(LATE_SUFFIX) and p.window_s == 10 and p.dims_key == "*"]
    assert late10.state["r"] == 2  # every late event of the window, not only the new one
    stage2.feed("calls:0", out.partials, out.mark_ms)
    assert (stage2.latest(10, T0_MS).requests, stage2.latest(10, T0_MS).revision) == (3, 3)
    # the same late partial delivered again (a crash before the close mark was written): no change
    stage2.feed("calls:0", out.partials, out.mark_ms)
    assert len(stage2.published[(10, T0_MS, "*")]) == 3
    # a copy of an on-time event of the closed window is a duplicate too, not a revision
    assert w.apply([(6, call(0, 1.0))], now_wall=0).duplicates == 1


def test_several_late_parts_of_a_window_in_one_finalizer_batch_publish_it_again() -> None:
    """Partials of two partitions (or two closes of one) reach the finalizer before it publishes."""
    stage2 = Stage2(["calls:0", "calls:1"])
    parts = {src: windows(source=src) for src in ("calls:0", "calls:1")}
    for n, (src, w) in enumerate(parts.items()):
        w.apply([(0, call(10 * n, 1.0)), (1, call(10 * n + 1, 30.0))], now_wall=0)
        out = w.close(now_wall=0)
        stage2.feed(src, out.partials, out.mark_ms)
    assert stage2.latest(10, T0_MS).requests == 2
    late: list[Partial] = []
    for n, w in enumerate(parts.values()):
        w.apply([(2, call(100 + n, 2.0))], now_wall=0)
        late += w.close(now_wall=0).partials
        w.apply([(3, call(200 + n, 3.0))], now_wall=0)
        late += w.close(now_wall=0).partials
    for p in late:  # one batch of the partials topic: four changes of the window, then one publication
        stage2.fin.add_partial(p)
    stage2.feed("calls:0", [], parts["calls:0"].close_mark_ms)
    assert (stage2.latest(10, T0_MS).requests, stage2.latest(10, T0_MS).revision) == (6, 2)


def test_events_older_than_the_lateness_are_late_and_late_state_is_dropped() -> None:
    w = windows(lateness_s=60.0, horizon_s=120.0)
    w.apply([(0, call(0, 1.0)), (1, call(1, 70.0))], now_wall=0)
    w.close(now_wall=0)  # close mark 69 s
    res = w.apply([(2, call(2, 5.0))], now_wall=0)  # [0, 10) ended 59 s before the mark
    assert res.revised == 1 and res.late == []
    w.close(now_wall=0)
    assert [k[0] for k in w.late_accs] == [T0_MS]
    w.apply([(3, call(3, 125.0))], now_wall=0)  # mark 124 s: [0, 60) ended 64 s before it
    out = w.close(now_wall=0)
    assert [k[0] for k in out.removed_late] == [T0_MS] and w.late_accs == {}
    res = w.apply([(4, call(4, 62.0)), (5, call(5, 5.5))], now_wall=0)
    assert res.revised == 1  # [60, 70) ended 54 s before the mark: still revised
    assert [(x.offset, x.window_end_ms) for x in res.late] == [(5, T0_MS + 10_000)]
    # a late event's copy stays a duplicate for the dedup horizon, past the lateness
    assert w.apply([(6, call(2, 5.0))], now_wall=0).duplicates == 1


def test_lateness_is_bounded_by_the_dedup_horizon_and_the_finalizer_retention(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="dedup horizon"):
        windows(lateness_s=300.0, horizon_s=60.0)
    f = tmp_path / "llmpulse.yaml"
    f.write_text("worker:\n  dedup_horizon_s: 60\n")
    with pytest.raises(ConfigError, match=r"llmpulse.yaml: key 'worker'.*allowed_lateness_s \(900\) must not exceed dedup_horizon_s \(60\)"):
        load_settings(f, environ={})
    f.write_text("worker:\n  allowed_lateness_s: 1800\n  dedup_horizon_s: 3600\n")
    with pytest.raises(ConfigError, match=r"worker.allowed_lateness_s.*less than or equal to 900"):
        load_settings(f, environ={})
    f.write_text("worker:\n  dedup_horizon_s: 60\n  allowed_lateness_s: 30\n")
    assert load_settings(f, environ={}).worker.allowed_lateness_s == 30
    f.write_text("{}\n")
    wcfg = load_settings(f, environ={}).worker
    assert wcfg.allowed_lateness_s * 1000 == RETAIN_MS and wcfg.dedup_horizon_s >= wcfg.allowed_lateness_s


# -- restore in the middle -----------------------------------------------------------------------
def restore(state: dict[str, Any]) -> PartitionWindows:
    """What a restarted worker reads back (window_state.load)."""
    w = windows()
    WS.load(w, 0, state.items())
    return w


def delivered(w: PartitionWindows, state: dict[str, Any]) -> None:
    """Once a close's partials are delivered the worker writes its meta (window_stage._await_delivered)."""
    state[WS.meta_key(0, w.kind)] = w.meta_state()


def test_a_restore_before_the_late_partial_went_out_counts_each_late_event_once() -> None:
    on_time = [call(i, i * 0.5) for i in range(30)]  # 0 .. 15 s
    late = [call(100 + i, 2.0 + i * 0.25, model=f"m{i % 2}") for i in range(8)]  # in [0, 10)
    closer = call(99, 70.0)  # closes [0, 10), [10, 20) and [0, 60)

    def run_to_first_close() -> tuple[PartitionWindows, dict[str, Any], Stage2]:
        w = windows()
        state: dict[str, Any] = {}
        stage2 = Stage2(["calls:0"])
        w.apply([*enumerate(on_time), (30, closer)], now_wall=0)
        persist(w, state)
        out = w.close(now_wall=0)
        stage2.feed("calls:0", out.partials, out.mark_ms)
        delivered(w, state)
        return w, state, stage2

    batch = [(31 + i, e) for i, e in enumerate(late[:5])]
    # 1. killed after the batch's state (late accumulators, ids, meta) was written, before the close
    w, state, stage2 = run_to_first_close()
    w.apply(batch, now_wall=0)
    persist(w, state)
    r = restore(dict(state))
    assert r.apply(batch, now_wall=0).revised == 0  # redelivered from an older commit: skipped by offset
    out = r.close(now_wall=0)
    stage2.feed("calls:0", out.partials, out.mark_ms)
    assert stage2.latest(10, T0_MS).requests == 20 + 5
    res = r.apply([(36 + i, e) for i, e in enumerate(late[5:] + late[:2])], now_wall=0)
    assert (res.revised, res.duplicates) == (3, 2)  # the restored ids know the late events
    out = r.close(now_wall=0)
    stage2.feed("calls:0", out.partials, out.mark_ms)
    assert stage2.latest(10, T0_MS).requests == 20 + 8 and stage2.latest(60, T0_MS).requests == 30 + 8

    # 2. killed after the late accumulators and ids were written, before the batch's meta
    w, state, stage2 = run_to_first_close()
    w.apply(batch, now_wall=0)
    persist(w, state, meta=False)
    r = restore(dict(state))
    res = r.apply(batch, now_wall=0)  # replayed: the ids are recorded again, the counts are not
    assert (res.revised, res.duplicates) == (5, 0)
    out = r.close(now_wall=0)
    stage2.feed("calls:0", out.partials, out.mark_ms)
    assert stage2.latest(10, T0_MS).requests == 25
    assert r.apply([(40, late[0])], now_wall=0).duplicates == 1

    # 3. killed after the late partial went out: the restored state emits the same partial again
    w, state, stage2 = run_to_first_close()
    w.apply(batch, now_wall=0)
    persist(w, state)
    out = w.close(now_wall=0)
    stage2.feed("calls:0", out.partials, out.mark_ms)
    revisions = len(stage2.published[(10, T0_MS, "*")])
    r = restore(dict(state))
    again = r.close(now_wall=0)
    assert sorted((p.window_s, p.dims_key, p.state["r"]) for p in again.partials if p.source.endswith(LATE_SUFFIX)) == sorted(
        (p.window_s, p.dims_key, p.state["r"]) for p in out.partials if p.source.endswith(LATE_SUFFIX)
    )
    stage2.feed("calls:0", again.partials, again.mark_ms)
    assert len(stage2.published[(10, T0_MS, "*")]) == revisions and stage2.latest(10, T0_MS).requests == 25


def test_late_partials_stay_within_the_finalizer_retention() -> None:
    """A partial emitted for a late event is never refused by the finalizer as stale."""
    w = windows(lateness_s=RETAIN_MS / 1000, horizon_s=RETAIN_MS / 1000)
    stage2 = Stage2(["calls:0"])
    pos = 0
    for minute in range(0, 40):
        w.apply([(pos, call(pos, minute * 60.0 + 1))], now_wall=0)
        pos += 1
        out = w.close(now_wall=0)
        stage2.feed("calls:0", out.partials, out.mark_ms)
        # events of every past window up to (and past) the allowed lateness, oldest first
        seconds = [(minute - back) * 60.0 + 3 for back in range(20, 0, -2) if minute >= back]
        old = [(pos + j, call(pos + j, sec)) for j, sec in enumerate(seconds)]
        pos += len(old)
        res = w.apply(old, now_wall=0)
        out = w.close(now_wall=0)
        stage2.feed("calls:0", out.partials, out.mark_ms)  # asserts every partial is accepted
        assert res.revised + len(res.late) == len(old)
        assert res.revised == sum(1 for _, e in old if e.ts >= T0 + timedelta(minutes=minute - 15))
    assert stage2.fin.stale == 0
