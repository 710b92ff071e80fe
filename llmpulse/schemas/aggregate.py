"""WindowAggregate: the figures of one closed event-time window for one dimension set."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from llmpulse.schemas.base import NonNegFloat, NonNegInt, UtcDatetime, WireModel

AggregateKind = Literal["calls", "gpu", "feedback", "host"]
Dimensions = Annotated[dict[str, str], Field(max_length=8)]


def dimensions_key(dimensions: dict[str, str]) -> str:
    """Canonical text of a dimension set: `model=a,app=b` sorted by name; `*` for global."""
    if not dimensions:
        return "*"
    return ",".join(f"{k}={dimensions[k]}" for k in sorted(dimensions))


def aggregate_id(kind: str, window_s: int, window_start_ms: int, dims_key: str) -> str:
    """Deterministic key of a window aggregate: re-publication overwrites, never adds."""
    return f"{kind}|{window_s}|{window_start_ms}|{dims_key}"


class WindowAggregate(WireModel):
    aggregate_id: str
    kind: AggregateKind
    window_s: Annotated[int, Field(gt=0)]
    window_start: UtcDatetime
    window_end: UtcDatetime
    dimensions: Dimensions = Field(default_factory=dict)
    dims_key: str = "*"
    # calls
    requests: NonNegInt = 0
    errors: NonNegInt = 0
    errors_by_type: dict[str, int] = Field(default_factory=dict)
    qps: NonNegFloat = 0.0
    error_rate: NonNegFloat = 0.0
    success_rate: NonNegFloat = 1.0
    latency_sum_ms: NonNegFloat = 0.0
    latency_avg_ms: NonNegFloat | None = None
    latency_p50_ms: NonNegFloat | None = None
    latency_p95_ms: NonNegFloat | None = None
    latency_p99_ms: NonNegFloat | None = None
    ttft_p95_ms: NonNegFloat | None = None
    prompt_tokens: NonNegInt = 0
    completion_tokens: NonNegInt = 0
    total_tokens: NonNegInt = 0
    cost_usd: NonNegFloat = 0.0
    unpriced_requests: NonNegInt = 0
    # feedback
    feedback_count: NonNegInt = 0
    intent_accuracy: NonNegFloat | None = None
    relevance_avg: NonNegFloat | None = None
    # gpu
    samples: NonNegInt = 0
    gpu_util_avg_pct: NonNegFloat | None = None
    gpu_util_max_pct: NonNegFloat | None = None
    memory_used_max_bytes: NonNegInt | None = None
    memory_util_avg_pct: NonNegFloat | None = None
    temperature_max_c: NonNegFloat | None = None
    power_avg_w: NonNegFloat | None = None
    # host (samples and memory_used_max_bytes as for gpu)
    host_cpu_avg_pct: NonNegFloat | None = None
    host_cpu_max_pct: NonNegFloat | None = None
    host_memory_avg_pct: NonNegFloat | None = None
    host_memory_max_pct: NonNegFloat | None = None
    host_load1_avg: NonNegFloat | None = None
    # 1 when first published; higher when backfilled events corrected the window
    revision: Annotated[int, Field(ge=0)] = 1
