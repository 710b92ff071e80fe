"""`WindowAggregate` as the worker writes it to the aggregates topic: a msgspec twin of the
model (`WireAggregate`) and `encode_aggregate`, byte for byte `codec.encode(agg)`.

Stage 2 writes about one aggregate per event on sparse traffic, and pydantic's serializer
cost about 5.5 us of it; msgspec writes the same bytes in about 2.5. The twin's fields are
the model's, in its order (checked at import), and an aggregate msgspec would write
otherwise than pydantic falls back to pydantic's serializer, so the topic's bytes (a public
contract) never depend on which path wrote them (tests/test_aggregate_encoding.py).

A module of its own, not `aggregate.py`: the SDK's light install (no msgspec) imports
`llmpulse.schemas`, and only the worker imports this.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

from llmpulse.schemas.aggregate import WindowAggregate

_WireFloat = Annotated[float, msgspec.Meta(gt=-1e16, lt=1e16)]
"""A float msgspec writes as pydantic does: both write a float's shortest round-trip text, but
from 1e16 on msgspec writes `1e16` where pydantic writes `1e+16` (and a non-finite one, which
neither writes but as null, is left to pydantic: its check fails)."""


class WireAggregate(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True, gc=False):
    """`WindowAggregate` as `encode_aggregate` has msgspec write it: the same fields in the same
    order (checked at import), each defaulting to None and left out when None (`omit_defaults`:
    pydantic's `exclude_none`). Made by `msgspec.convert` of a model's values, which checks
    what msgspec would write otherwise than pydantic: a float field's value is a float below
    1e16 in magnitude (an int there is made a float, as pydantic writes it: `5.0`), an int
    field's an int, no name but the model's."""

    schema_version: int | None = None
    aggregate_id: str | None = None
    kind: str | None = None
    window_s: int | None = None
    window_start: datetime | None = None
    window_end: datetime | None = None
    dimensions: dict[str, str] | None = None
    dims_key: str | None = None
    requests: int | None = None
    errors: int | None = None
    errors_by_type: dict[str, int] | None = None
    qps: _WireFloat | None = None
    error_rate: _WireFloat | None = None
    success_rate: _WireFloat | None = None
    latency_sum_ms: _WireFloat | None = None
    latency_avg_ms: _WireFloat | None = None
    latency_p50_ms: _WireFloat | None = None
    latency_p95_ms: _WireFloat | None = None
    latency_p99_ms: _WireFloat | None = None
    ttft_p95_ms: _WireFloat | None = None
    latency_hist: list[int] | None = None
    ttft_hist: list[int] | None = None
    ttft_count: int | None = None
    ttft_sum_ms: _WireFloat | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cost_usd: _WireFloat | None = None
    unpriced_requests: int | None = None
    feedback_count: int | None = None
    intent_accuracy: _WireFloat | None = None
    relevance_avg: _WireFloat | None = None
    samples: int | None = None
    gpu_util_avg_pct: _WireFloat | None = None
    gpu_util_max_pct: _WireFloat | None = None
    memory_used_max_bytes: int | None = None
    memory_util_avg_pct: _WireFloat | None = None
    temperature_max_c: _WireFloat | None = None
    power_avg_w: _WireFloat | None = None
    host_cpu_avg_pct: _WireFloat | None = None
    host_cpu_max_pct: _WireFloat | None = None
    host_memory_avg_pct: _WireFloat | None = None
    host_memory_max_pct: _WireFloat | None = None
    host_load1_avg: _WireFloat | None = None
    revision: int | None = None


def encode_aggregate(agg: WindowAggregate) -> bytes:
    """`codec.encode(agg)`, byte for byte: pydantic's JSON of the model without its None fields.

    Written by msgspec, a `WireAggregate` of the model's values (about two thirds of the cost
    of pydantic's serializer, which stage 2 paid once per aggregate: about one per event on
    sparse traffic), where it writes what pydantic does: the two write strings, ints,
    datetimes, dicts, lists and floats below 1e16 alike (tests/test_aggregate_encoding.py).
    An aggregate with any other value (a float of 1e16 or more, a non-finite one, a value
    not of its field's type) is written by the model's own serializer, and a value neither
    can write (a lone surrogate) raises pydantic's error, as codec.encode does."""
    try:
        return _WIRE_ENCODE(msgspec.convert(agg.__dict__, WireAggregate))
    except (TypeError, ValueError, OverflowError):  # ValueError: msgspec.ValidationError, UnicodeEncodeError
        return _SERIALIZER.to_json(agg, exclude_none=True)


if WireAggregate.__struct_fields__ != tuple(WindowAggregate.model_fields):
    raise TypeError("WireAggregate's fields are not WindowAggregate's, in its order")
_WIRE_ENCODE = msgspec.json.Encoder().encode
_SERIALIZER = WindowAggregate.__pydantic_serializer__
