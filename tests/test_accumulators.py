"""A window's aggregate as the finalizer builds it from an accumulator (its figures put into the
model without validating them again): the same model, and JSON, that validating them gives."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from llmpulse.schemas import CallEvent, WindowAggregate
from llmpulse.schemas.codec import encode
from llmpulse.schemas.feedback import Feedback
from llmpulse.schemas.gpu import GpuSample
from llmpulse.schemas.host import HostSample
from llmpulse.streams.accumulators import (
    CallAccumulator,
    FeedbackAccumulator,
    GpuAccumulator,
    HostAccumulator,
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
