"""WindowAggregate: the figures of one closed event-time window for one dimension set."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, Field

from llmpulse.schemas.base import NonNegFloat, NonNegInt, UtcDatetime, WireModel

AggregateKind = Literal["calls", "gpu", "feedback", "host"]
Dimensions = Annotated[dict[str, str], Field(max_length=8)]

LATENCY_BUCKETS_S = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
"""Upper bounds (seconds) of `latency_hist`: the boundaries the OpenTelemetry GenAI conventions advise
for `gen_ai.client.operation.duration`."""
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
"""Upper bounds (seconds) of `ttft_hist`: the boundaries the conventions advise for time to first token."""
Histogram = Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=64)]


def dimensions_key(dimensions: dict[str, str]) -> str:
    """Canonical text of a dimension set: `model=a,app=b` sorted by name; `*` for global."""
    if not dimensions:
        return "*"
    return ",".join(f"{k}={dimensions[k]}" for k in sorted(dimensions))


def aggregate_id(kind: str, window_s: int, window_start_ms: int, dims_key: str) -> str:
    """Deterministic key of a window aggregate: re-publication overwrites, never adds."""
    return aggregate_id_prefix(kind, window_s, window_start_ms) + dims_key


def aggregate_id_prefix(kind: str, window_s: int, window_start_ms: int) -> str:
    """What the ids of a window's aggregates start with: `aggregate_id` is it and the dims key
    (a window's thousands of aggregates take it made once)."""
    return f"{kind}|{window_s}|{window_start_ms}|"


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
    # histograms for Prometheus (llmpulse.sinks.prometheus): counts per bucket of LATENCY_BUCKETS_S /
    # TTFT_BUCKETS_S plus one above the last bound, from the window's DDSketch (values within 1% of a
    # bound may sit in the bucket beside theirs); empty on other kinds. TTFT sum and count are exact.
    latency_hist: Histogram = Field(default_factory=list)
    ttft_hist: Histogram = Field(default_factory=list)
    ttft_count: NonNegInt = 0
    ttft_sum_ms: NonNegFloat = 0.0
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

    # per-call figures derived from the sums (not on the wire): what rules judge when a call's
    # size, not the traffic, is what changed
    @property
    def cost_per_request(self) -> float | None:
        """Average cost of a priced call (calls without a price left out); None without one."""
        priced = self.requests - self.unpriced_requests
        return self.cost_usd / priced if priced > 0 else None

    @property
    def tokens_per_request(self) -> float | None:
        """Average tokens (prompt + completion) of a call; None without calls."""
        return self.total_tokens / self.requests if self.requests > 0 else None

    @classmethod
    def of_figures(cls, values: dict[str, Any], base: dict[str, Any] | None = None) -> WindowAggregate:
        """An aggregate of values that are valid already (the worker's own figures, every
        required field among them; `values` is taken over), not validated again. `base`:
        the fields to put them in (every field, in declared order, e.g. a window's shared
        ones: streams.accumulators.WindowResults), else a blank aggregate's.

        What `model_construct` does, at a fraction of its cost (its Python loop over the
        fields cost the finalizer more than validating), and what `model_copy(update=values)`
        of a blank aggregate gives: the fields in declared order (so its JSON is byte for
        byte a validated one's), the values put in; a field with a default factory left out
        gets a fresh default."""
        fields = (_BLANK_FIELDS if base is None else base).copy()
        for name, factory in _FACTORIES.items():
            if name not in values:
                fields[name] = factory()
        fields.update(values)
        return cls.of_fields(fields, _BLANK_SET.union(values))

    @classmethod
    def of_fields(cls, fields: dict[str, Any], fields_set: AbstractSet[str]) -> WindowAggregate:
        """An aggregate of every field, valid already, in declared order (`fields` is taken over:
        no value in it may be another aggregate's), whose `model_fields_set` is `fields_set`
        (the names given values, with the blank's: `fields_set_of`): what `of_figures` makes
        of its fields. The set is copied: pydantic adds to it when a field is assigned, and a
        caller passes one shared set for all its aggregates (a copy costs less than a union)."""
        agg = _new(cls)
        # BaseModel's slots set through their descriptors: what object.__setattr__ finds by
        # name, without the lookup (stage 2 makes about one aggregate per event: sparse traffic)
        _set_dict(agg, fields)
        _set_fields_set(agg, set(fields_set))
        _set_extra(agg, None)
        _set_private(agg, None)
        return agg


def fields_set_of(names: Iterable[str]) -> frozenset[str]:
    """The `model_fields_set` of an aggregate of `of_figures` given values for `names`."""
    return frozenset(_BLANK_SET.union(names))


def blank_fields() -> dict[str, Any]:
    """Every field of a blank aggregate, in declared order (a `base` for `of_figures`)."""
    return _BLANK_FIELDS.copy()


_EPOCH = datetime.fromtimestamp(0, tz=UTC)
_BLANK = WindowAggregate(aggregate_id="-", kind="calls", window_s=1, window_start=_EPOCH, window_end=_EPOCH)
_BLANK_FIELDS = dict(_BLANK.__dict__)
_BLANK_SET = set(_BLANK.model_fields_set)  # what `model_copy(update=values)` of it adds values' names to (read only)
_FACTORIES = {
    name: cast(Callable[[], Any], field.default_factory)
    for name, field in WindowAggregate.model_fields.items()
    if field.default_factory is not None
}

_new = object.__new__
_set_dict = BaseModel.__dict__["__dict__"].__set__
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__
