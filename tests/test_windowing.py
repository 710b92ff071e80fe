"""Event-time windows, partial merging and the quantile sketch: deterministic replays."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from llmpulse.schemas import CallEvent
from llmpulse.streams.finalizing import Finalizer
from llmpulse.streams.sketch import RELATIVE_ACCURACY, QuantileSketch
from llmpulse.streams.windowing import PartitionWindows, event_ms

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DIMS = [[], ["model"], ["app"], ["user"]]


def call(sec: float, model: str = "m1", err: bool = False, lat: float = 100.0, app: str = "a", user: str | None = "u") -> CallEvent:
    return CallEvent(
        ts=T0 + timedelta(seconds=sec), model=model, app=app, user=user,
        status_code=500 if err else 200, error_type="upstream_5xx" if err else None,
        latency_ms=lat, prompt_tokens=10, completion_tokens=5, cost_usd=0.001,
    )  # fmt: skip


def windows(source: str = "calls:0", grace: float = 2.0, idle: float = 5.0) -> PartitionWindows:
    return PartitionWindows("calls", source, [10, 60], grace, idle, DIMS)


def finals(partials: list, sources: list[str]) -> dict:
    f = Finalizer({"calls": sources})
    for p in partials:
        f.add_partial(p)
    for s in sources:
        f.set_mark("calls", s, 10**15)
    return {(k[1], k[2], k[3]): agg for k, agg in f.ready()}


def test_counts_and_sums_are_exact_per_window_and_dimension() -> None:
    w = windows()
    evs = [call(i * 0.5, model=f"m{i % 3}", err=i % 7 == 0) for i in range(240)]  # 0..120 s
    w.apply(list(enumerate(evs)), now_wall=0)
    res = w.close(now_wall=0, force=True)
    got = finals(res.partials, ["calls:0"])
    start = int(T0.timestamp() * 1000)
    g10 = got[(10, start, "*")]
    assert g10.requests == 20
    assert g10.errors == sum(1 for i in range(20) if i % 7 == 0)
    assert g10.prompt_tokens == 200 and g10.total_tokens == 300
    assert g10.cost_usd == pytest.approx(0.02, abs=1e-12)
    g60 = got[(60, start, "*")]
    assert g60.requests == 120
    assert sum(a.requests for (s, _, dk), a in got.items() if s == 60 and dk.startswith("model=")) == 240
    assert got[(10, start, "model=m0")].requests == 7


def test_events_fall_in_the_windows_of_their_time_in_ms() -> None:
    """apply places most events by comparing their datetime with their window's bounds, not by
    their time in ms: the same windows and event time as event_ms gives, at and beside the
    bounds, on ms, far from the epoch (float rounding) and at datetime's end (no bounds)."""
    us = timedelta(microseconds=1)
    near = [timedelta(0), us, -us, timedelta(milliseconds=1), timedelta(seconds=10) - us, timedelta(seconds=3.123)]
    for base in (T0, datetime(9999, 12, 31, 23, 59, 0, tzinfo=UTC), datetime(1900, 1, 1, tzinfo=UTC)):
        times = [base + d + timedelta(seconds=s) for d in near for s in (0, 10, 20)]
        if base.year == 9999:
            times += [datetime.max.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC) - 2 * us]
        random.Random(base.year).shuffle(times)
        w = windows()
        w.apply([(i, call(0).model_copy(update={"ts": t})) for i, t in enumerate(times)], now_wall=0)
        counted: dict[int, int] = {}
        for (start, _), acc in w.accs.items():
            counted[start] = counted.get(start, 0) + acc.requests  # type: ignore[attr-defined]
        expected: dict[int, int] = {}
        for t in times:
            ms = event_ms(t)
            expected[ms - ms % 10_000] = expected.get(ms - ms % 10_000, 0) + 1
        assert counted == expected
        assert w.max_ts_ms == max(map(event_ms, times))


def test_window_closes_only_after_end_plus_grace_and_late_events_are_reported() -> None:
    w = windows(grace=2.0)
    w.apply([(0, call(1)), (1, call(9)), (2, call(11))], now_wall=100)
    assert w.close(now_wall=100).partials == []  # event time 11 < 10 + 2
    w.apply([(3, call(12.5))], now_wall=100)  # within grace? 12.5 >= 12: closes [0,10)
    res = w.close(now_wall=100)
    ten = [p for p in res.partials if p.window_s == 10 and p.dims_key == "*"]
    assert len(ten) == 1 and ten[0].state["r"] == 2
    late = w.apply([(4, call(5)), (5, call(13))], now_wall=100).late
    assert [x.offset for x in late] == [4]
    # an event inside the grace period of an open window is counted
    w2 = windows(grace=5.0)
    w2.apply([(0, call(1)), (1, call(12)), (2, call(9))], now_wall=0)
    res2 = w2.close(now_wall=0, force=True)
    assert [p.state["r"] for p in res2.partials if p.window_s == 10 and p.dims_key == "*" and p.start_ms == int(T0.timestamp() * 1000)] == [2]


def test_last_window_closes_when_traffic_stops() -> None:
    w = windows(grace=1.0, idle=2.0)
    w.apply([(0, call(1)), (1, call(3))], now_wall=1000.0)
    assert w.close(now_wall=1000.5).partials == []
    assert w.close(now_wall=1002.0).partials == []  # idle, but event time only reached 5 s
    res = w.close(now_wall=1000.0 + 8.5)  # idle: 3 + 8.5 - 1 >= 10
    assert [p.window_s for p in res.partials if p.dims_key == "*"] == [10]
    res = w.close(now_wall=1000.0 + 58.1)
    assert [p.window_s for p in res.partials if p.dims_key == "*"] == [60]
    assert w.accs == {}


def test_replayed_offsets_never_count_twice() -> None:
    w = windows()
    batch = [(i, call(i * 0.1)) for i in range(50)]
    w.apply(batch[:30], now_wall=0)
    w.apply(batch, now_wall=0)  # redelivery after an uncommitted offset
    res = w.close(now_wall=0, force=True)
    assert sum(p.state["r"] for p in res.partials if p.window_s == 60 and p.dims_key == "*") == 50


def test_restored_state_resumes_exactly() -> None:
    w = windows()
    batch = [(i, call(i * 0.3, model=f"m{i % 2}")) for i in range(100)]
    w.apply(batch[:60], now_wall=0)
    # persist as the worker does, but lose the last batch's accumulator writes partially
    saved = {k: w.acc_state(k) for k in w.accs}
    meta = w.meta_state()
    w.apply(batch[60:80], now_wall=0)
    half = dict(list({k: w.acc_state(k) for k in w.accs}.items())[:1])
    saved.update(half)
    r = windows()
    r.restore_meta(meta)
    for k, s in saved.items():
        r.restore_acc(k, s)
    r.apply(batch[60:], now_wall=0)
    res = r.close(now_wall=0, force=True)
    assert sum(p.state["r"] for p in res.partials if p.window_s == 60 and p.dims_key == "*") == 100


def test_partials_from_several_partitions_merge_once() -> None:
    parts = []
    for p in range(3):
        w = windows(source=f"calls:{p}")
        w.apply([(i, call(i * 0.1, model=f"m{p}")) for i in range(50)], now_wall=0)
        parts += w.close(now_wall=0, force=True).partials
    got = finals(parts + parts[:5], ["calls:0", "calls:1", "calls:2"])  # a re-sent partial
    start = int(T0.timestamp() * 1000)
    assert got[(10, start, "*")].requests == 150
    assert got[(60, start, "model=m1")].requests == 50


def test_finalizer_waits_for_every_source() -> None:
    f = Finalizer({"calls": ["calls:0", "calls:1"]})
    w = windows(source="calls:0")
    w.apply([(0, call(1))], now_wall=0)
    for p in w.close(now_wall=0, force=True).partials:
        f.add_partial(p)
    f.set_mark("calls", "calls:0", 10**15)
    assert f.ready() == []
    f.set_mark("calls", "calls:1", int(T0.timestamp() * 1000) + 10_000)
    assert {(k[1], k[3]) for k, _ in f.ready()} == {(10, "*"), (10, "model=m1"), (10, "app=a"), (10, "user=u")}


def test_sketch_quantiles_within_stated_relative_error() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(5, 1.2) for _ in range(20_000)]
    a, b = QuantileSketch(), QuantileSketch()
    for i, v in enumerate(values):
        (a if i % 2 else b).add(v)
    a.merge(b)
    ordered = sorted(values)
    for q in (0.5, 0.95, 0.99):
        true = ordered[int(q * (len(ordered) - 1))]
        est = a.quantile(q)
        assert est is not None
        assert abs(est - true) / true <= RELATIVE_ACCURACY + 1e-9
