"""A window's aggregate as the finalizer builds it from an accumulator (its figures put into the
model without validating them again): the same model, and JSON, that validating them gives."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from llmpulse.schemas import CallEvent, WindowAggregate
from llmpulse.schemas.codec import encode
from llmpulse.schemas.feedback import Feedback
from llmpulse.schemas.gpu import GpuSample
from llmpulse.schemas.host import HostSample
from llmpulse.schemas.partials import decode_call_state, pack_state, unpack_state
from llmpulse.streams.accumulators import (
    ACCUMULATORS,
    CallAccumulator,
    FeedbackAccumulator,
    GpuAccumulator,
    HostAccumulator,
    WindowResults,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T0_MS = int(T0.timestamp() * 1000)


def accumulators() -> list[CallAccumulator | FeedbackAccumulator | GpuAccumulator | HostAccumulator]:
    calls, feedback, gpu, host = CallAccumulator(), FeedbackAccumulator(), GpuAccumulator(), HostAccumulator()
    for i in range(20):
        ts = T0 + timedelta(seconds=i)
        calls.agg(CallEvent(
            ts=ts, model="m", latency_ms=37.5 * i, ttft_ms=None if i % 3 else 12.0 * i, prompt_tokens=i,
            completion_tokens=2 * i, total_tokens=3 * i, cost_usd=None if i % 5 == 0 else 0.001 * i,
            status_code=500 if i % 4 == 0 else 200, error_type="timeout" if i % 8 == 0 else None,
        ))  # fmt: skip
        feedback.agg(Feedback(call_event_id=f"c{i}", ts=ts, intent_correct=i % 2 == 0, relevance=None if i % 3 else 4.0))
        gpu.agg(GpuSample(
            ts=ts, host="h", gpu_index=0, utilization_gpu_pct=4.5 * i, memory_used_bytes=10**9 + i,
            temperature_c=None if i < 5 else 40.0 + i, power_draw_w=None if i % 2 else 250.0,
        ))  # fmt: skip
        host.agg(HostSample(
            ts=ts, host="h", cpu_pct=3.0 * i, memory_used_bytes=2**30 + i, memory_total_bytes=2**32,
            memory_used_pct=25.0, load1=None if i % 2 else 0.5 * i,
        ))  # fmt: skip
    # and each kind with nothing in it (the None and zero figures)
    return [calls, feedback, gpu, host, CallAccumulator(), FeedbackAccumulator(), GpuAccumulator(), HostAccumulator()]


def test_each_kinds_aggregate_is_what_validating_its_figures_gives() -> None:
    for acc in accumulators():
        dims = {"model": "m", "app": "a"}
        agg = acc.result(60, T0_MS, dims, "app=a,model=m", revision=3)
        again = WindowAggregate.model_validate_json(encode(agg))
        assert again == agg and encode(again) == encode(agg), acc.kind
        assert agg.model_fields_set <= set(WindowAggregate.model_fields), acc.kind  # no misspelt figure
        assert (agg.kind, agg.aggregate_id, agg.revision) == (acc.kind, f"{acc.kind}|60|{T0_MS}|app=a,model=m", 3)
        assert agg.window_end - agg.window_start == timedelta(seconds=60)
        dims["model"] = "changed"  # the caller's dict is not the aggregate's
        assert agg.dimensions == {"model": "m", "app": "a"}


def test_aggregates_share_no_mutable_default() -> None:
    first = GpuAccumulator().result(10, T0_MS, {}, "*")
    first.errors_by_type["x"] = 1
    first.latency_hist.append(1)
    first.ttft_hist.append(1)
    second = GpuAccumulator().result(10, T0_MS, {}, "*")
    assert (second.errors_by_type, second.latency_hist, second.ttft_hist) == ({}, [], [])


def reference_aggregate(kind: str, parts: list[bytes], window_s: int, dims: dict[str, str], dk: str, revision: int) -> WindowAggregate:
    """What stage 2 built before: each part's state decoded to dicts, `from_state` of the first,
    `merge` of each next in order, `result`."""
    cls = ACCUMULATORS[kind]
    acc: Any = cls.from_state(unpack_state(parts[0]))
    for p in parts[1:]:
        acc.merge(cls.from_state(unpack_state(p)))
    return acc.result(window_s, T0_MS, dims, dk, revision)


def test_a_windows_aggregates_from_packed_parts_are_the_merged_accumulators_results() -> None:
    """WindowResults (stage 2: states decoded typed, merged as states, one pass over the sorted
    bins) gives, to the bit, the model and bytes of merging the accumulators in order."""
    rnd = random.Random(15)
    for kind, make in (("calls", random_call), ("gpu", random_gpu), ("feedback", random_feedback), ("host", random_host)):
        cls = ACCUMULATORS[kind]
        results = WindowResults(kind, 60, T0_MS)
        for _ in range(300):
            parts = []
            for _ in range(rnd.choice([1, 1, 1, 2, 3, 5])):
                acc: Any = cls()
                for _ in range(rnd.choice([1, 1, 2, 7, 40])):
                    acc.agg(make(rnd))
                state = acc.to_state()
                if kind == "calls" and rnd.random() < 0.1:
                    del state["tf"]  # a state written before the TTFT sum was kept
                parts.append(pack_state(state))
            dims = {"model": rnd.choice(["a", "b"])}
            rev = rnd.choice([1, 2])
            got = results.aggregate(parts, dims, f"model={dims['model']}", rev)
            want = reference_aggregate(kind, parts, 60, dims, f"model={dims['model']}", rev)
            assert list(got.__dict__.items()) == list(want.__dict__.items())  # values and their order
            assert got.model_fields_set == want.model_fields_set
            assert encode(got) == encode(want)
            assert [type(v) for v in got.__dict__.values()] == [type(v) for v in want.__dict__.values()]
        dims["model"] = "changed"  # the caller's dict is not the aggregate's
        assert got.dimensions != dims


def random_call(rnd: random.Random) -> CallEvent:
    err = rnd.random() < 0.2
    return CallEvent(
        ts=T0, model="m", latency_ms=rnd.choice([0.0, 0.0005, 12.5, rnd.lognormvariate(5, 2), 3e17]),
        ttft_ms=rnd.choice([None, None, 0.0, rnd.lognormvariate(3, 1)]), prompt_tokens=rnd.randint(0, 900),
        completion_tokens=rnd.randint(0, 90), cost_usd=rnd.choice([None, 0.0, rnd.random() / 100]),
        status_code=rnd.choice([200, 429, 500, 0]) if err else 200,
        error_type=rnd.choice([None, "timeout", "rate_limit", "overloaded"]) if err else None,
    )  # fmt: skip


def random_gpu(rnd: random.Random) -> GpuSample:
    return GpuSample(ts=T0, host="h", gpu_index=0, utilization_gpu_pct=rnd.random() * 100, memory_used_bytes=rnd.randint(0, 10**10),
                     temperature_c=rnd.choice([None, 55.5]), power_draw_w=rnd.choice([None, 210.0]))  # fmt: skip


def random_feedback(rnd: random.Random) -> Feedback:
    intent = rnd.choice([None, True, False])
    return Feedback(call_event_id="c", ts=T0, intent_correct=intent, relevance=rnd.choice(([None] if intent is not None else []) + [0.0, 4.5]))


def random_host(rnd: random.Random) -> HostSample:
    return HostSample(ts=T0, host="h", cpu_pct=rnd.random() * 100, memory_used_bytes=2**30, memory_total_bytes=2**32,
                      memory_used_pct=rnd.random() * 100, load1=rnd.choice([None, 0.5]))  # fmt: skip


def test_a_calls_batch_added_at_once_is_the_same_state_as_one_event_at_a_time() -> None:
    """Stage 1 hands an accumulator its events of a batch at once (`agg_many`): the same state to
    the bit as adding them one by one (`agg`, its own code), in any split, and the same sketch
    bins as the sketch's own `add` (which both write out)."""
    from llmpulse.streams.sketch import QuantileSketch

    rnd = random.Random(15)
    events = [
        CallEvent(
            model="m", ts=T0, status_code=rnd.choice([200, 200, 0, 404, 503]),
            error_type=rnd.choice([None, None, "timeout"]),
            latency_ms=rnd.choice([0.0, 0.001, 0.0011, rnd.uniform(0, 9000), rnd.lognormvariate(5, 2)]),
            ttft_ms=rnd.choice([None, 0.0, rnd.uniform(0, 900)]), prompt_tokens=rnd.randrange(5000),
            completion_tokens=rnd.randrange(900), total_tokens=rnd.choice([None, rnd.randrange(9000)]),
            cost_usd=rnd.choice([None, 0.0, rnd.uniform(0, 0.3)]),
        )
        for _ in range(500)
    ]
    one_by_one = CallAccumulator()
    for e in events:
        one_by_one.agg(e)
    at_once = CallAccumulator()
    at_once.agg_many(events)
    in_runs = CallAccumulator()
    for lo in range(0, len(events), 37):
        in_runs.agg_many(events[lo : lo + 37])
    expected = encode_state(one_by_one)
    assert encode_state(at_once) == expected and encode_state(in_runs) == expected
    latency, ttft = QuantileSketch(), QuantileSketch()
    for e in events:
        latency.add(e.latency_ms)
        if e.ttft_ms is not None:
            ttft.add(e.ttft_ms)
    assert at_once.to_state()["l"] == latency.to_state() and at_once.to_state()["t"] == ttft.to_state()
    assert at_once.errors == sum(1 for e in events if e.error_type or e.status_code >= 400 or e.status_code == 0)


def encode_state(acc: CallAccumulator) -> bytes:
    """The state as bytes (floats to the bit, dicts in their order)."""
    return pack_state(acc.to_state())


def test_merged_is_merge_of_each_into_a_new_accumulator() -> None:
    """`CallAccumulator.merged` (the roll-up's merge, written out and skipping what an empty
    member holds) is `merge` of each into a new accumulator in order, to the bit: float sums,
    error types and sketch bins in the same order, restored states and one-event members alike."""
    rnd = random.Random(15)
    for _ in range(300):
        accs = []
        for _ in range(rnd.choice([0, 1, 2, 3, 12])):
            acc = CallAccumulator()
            for _ in range(rnd.choice([0, 1, 1, 2, 9])):
                acc.agg(random_call(rnd))
            if rnd.random() < 0.3:  # as stage 1 restores it
                acc = CallAccumulator.from_state(unpack_state(pack_state(acc.to_state())))
            accs.append(acc)
        one_by_one = CallAccumulator()
        for acc in accs:
            one_by_one.merge(acc)
        merged = CallAccumulator.merged(accs)
        assert encode_state(merged) == encode_state(one_by_one)
        assert merged.to_state() == one_by_one.to_state()
        assert [type(v) for v in merged.to_state().values()] == [type(v) for v in one_by_one.to_state().values()]


def test_a_calls_accumulator_is_one_object_for_the_cyclic_gc() -> None:
    """At many users and keys stage 1 holds an accumulator per event of its open windows, and stage 2
    decodes a state per dimension set: what the cyclic GC walks. An accumulator (a slots object,
    always tracked) refers to nothing tracked but its class (its sketches are its own fields, its dicts
    hold strings and integers), however it was made; a decoded state is not tracked at all
    (schemas.partials: gc=False Structs, which hold no reference back to themselves)."""
    import gc

    rnd = random.Random(15)
    made = CallAccumulator()
    for _ in range(50):
        made.agg(random_call(rnd))
    for acc in (
        made, CallAccumulator.merged([made, made]), CallAccumulator.from_state(unpack_state(pack_state(made.to_state()))),
        CallAccumulator.of_call_state(decode_call_state(pack_state(made.to_state()))),
    ):  # fmt: skip
        assert acc.err_types and acc.lat_bins
        assert [o for o in gc.get_referents(acc) if gc.is_tracked(o) and o is not CallAccumulator] == []
    state = decode_call_state(pack_state(made.to_state()))
    assert not gc.is_tracked(state) and not gc.is_tracked(state.l) and not gc.is_tracked(state.t)
