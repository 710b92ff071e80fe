"""The sink's hot path for calls: msgspec decoding and column-oriented Arrow inserts.

pydantic's CallEvent stays the authority on what is valid. The msgspec structs below
accept a subset of what CallEvent accepts (same fields, types, bounds and patterns;
strict types, so e.g. "12" is not an int here); any message they refuse is decoded
again by pydantic, which keeps its valid events and drops the invalid ones (the worker
dead-letters those). Rows become Arrow columns in C; costs are rounded to nano-USD
integers in Arrow and written as Decimal(18, 9) without a Python Decimal per row.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from llmpulse.schemas import CallEvent
from llmpulse.schemas.base import SCHEMA_VERSION, new_event_id
from llmpulse.schemas.call import CAPTURE_MAX_CHARS
from llmpulse.schemas.codec import MAX_BATCH_EVENTS, decode

_M = msgspec.Meta
_ID = r"^[A-Za-z0-9_.:\-]+$"


class CallStruct(msgspec.Struct, forbid_unknown_fields=True):
    model: Annotated[str, _M(min_length=1, max_length=256)]
    event_id: Annotated[str, _M(min_length=1, max_length=128, pattern=_ID)] | None = None
    ts: datetime | None = None
    schema_version: Annotated[int, _M(ge=1, le=SCHEMA_VERSION)] = SCHEMA_VERSION
    source: Literal["proxy", "sdk", "ingest"] = "sdk"
    provider: Annotated[str, _M(max_length=128)] = "unknown"
    response_model: Annotated[str, _M(max_length=256)] | None = None
    operation: Literal["chat", "completion", "embedding", "responses", "other"] = "chat"
    app: Annotated[str, _M(max_length=128)] = "default"
    user: Annotated[str, _M(max_length=256)] | None = None
    api_key_hash: Annotated[str, _M(max_length=128)] | None = None
    status_code: Annotated[int, _M(ge=0, le=999)] = 200
    error_type: Annotated[str, _M(max_length=64)] | None = None
    latency_ms: Annotated[float, _M(ge=0)] = 0.0
    ttft_ms: Annotated[float, _M(ge=0)] | None = None
    streamed: bool = False
    prompt_tokens: Annotated[int, _M(ge=0)] = 0
    completion_tokens: Annotated[int, _M(ge=0)] = 0
    total_tokens: Annotated[int, _M(ge=0)] | None = None
    cached_tokens: Annotated[int, _M(ge=0)] = 0
    reasoning_tokens: Annotated[int, _M(ge=0)] = 0
    tokens_estimated: bool = False
    cost_usd: Annotated[float, _M(ge=0)] | None = None
    prompt: Annotated[str, _M(max_length=CAPTURE_MAX_CHARS)] | None = None
    response: Annotated[str, _M(max_length=CAPTURE_MAX_CHARS)] | None = None


class CallBatch(msgspec.Struct, forbid_unknown_fields=True):
    schema_version: Annotated[int, _M(ge=1, le=SCHEMA_VERSION)]
    events: Annotated[list[CallStruct], _M(max_length=MAX_BATCH_EVENTS)]


_one = msgspec.json.Decoder(CallStruct)
_batch = msgspec.json.Decoder(CallBatch)


def _complete(events: list[CallStruct]) -> bool:
    """Fill the defaults pydantic computes; False if an event needs pydantic's judgement."""
    for e in events:
        ts = e.ts
        if ts is None:
            e.ts = datetime.now(UTC)
        elif ts.tzinfo is None:
            return False  # naive timestamps are invalid: let pydantic say so
        if e.event_id is None:
            e.event_id = new_event_id()
        if e.total_tokens is None:
            e.total_tokens = e.prompt_tokens + e.completion_tokens
    return True


def decode_calls(raw: bytes | None) -> tuple[list[Any], int]:
    """(events, invalid count): CallStruct or CallEvent objects with the same attributes."""
    if raw is not None:
        try:
            events = _batch.decode(raw).events if raw.find(b'"events"', 0, 64) >= 0 else [_one.decode(raw)]
            if _complete(events):
                return events, 0
        except (msgspec.ValidationError, msgspec.DecodeError):
            pass
    decoded = decode(raw, CallEvent)
    return list(decoded.valid), len(decoded.rejected)


CALL_COLUMNS = [
    "event_id", "ts", "source", "provider", "model", "response_model", "operation", "app",
    "user", "api_key_hash", "status_code", "error_type", "is_error", "latency_ms", "ttft_ms",
    "streamed", "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens",
    "reasoning_tokens", "tokens_estimated", "cost_usd", "prompt", "response",
]  # fmt: skip

_STR = ("event_id", "source", "provider", "model", "operation", "app")
_STR_EMPTY = ("response_model", "user", "api_key_hash", "error_type")  # NULL -> '' (String columns)
_U32 = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens")
_NANO_TYPE = pa.decimal128(18, 9)


def _nano_usd(costs: list[float | None]) -> pa.Array:
    """USD floats -> Decimal(18, 9) by their nano-USD integers, without per-row Decimals."""
    floats = pa.array(costs, type=pa.float64())
    nanos = pc.cast(pc.round(pc.multiply(floats, 1e9)), pa.int64())
    wide = pc.cast(nanos, pa.decimal128(38, 0))  # 16-byte unscaled integers
    return pa.Array.from_buffers(_NANO_TYPE, len(wide), wide.buffers(), null_count=wide.null_count)


def calls_arrow(events: list[Any]) -> bytes:
    """An Arrow IPC stream of the llm_calls columns (CALL_COLUMNS order)."""
    cols: dict[str, pa.Array] = {}
    for c in _STR:
        cols[c] = pa.array([getattr(e, c) for e in events], type=pa.string())
    for c in _STR_EMPTY:
        cols[c] = pa.array([getattr(e, c) or "" for e in events], type=pa.string())
    cols["ts"] = pa.array([e.ts for e in events], type=pa.timestamp("us", tz="UTC"))
    status = [e.status_code for e in events]
    cols["status_code"] = pa.array(status, type=pa.uint16())
    cols["is_error"] = pa.array(
        [e.error_type is not None or s >= 400 or s == 0 for e, s in zip(events, status, strict=True)],
        type=pa.bool_(),
    ).cast(pa.uint8())
    cols["latency_ms"] = pa.array([e.latency_ms for e in events], type=pa.float64())
    cols["ttft_ms"] = pa.array([e.ttft_ms for e in events], type=pa.float64())
    for c in ("streamed", "tokens_estimated"):
        cols[c] = pa.array([getattr(e, c) for e in events], type=pa.bool_())
    for c in _U32:
        cols[c] = pa.array([getattr(e, c) for e in events], type=pa.uint32())
    cols["cost_usd"] = _nano_usd([e.cost_usd for e in events])
    for c in ("prompt", "response"):
        cols[c] = pa.array([getattr(e, c) for e in events], type=pa.string())
    table = pa.Table.from_arrays([cols[c] for c in CALL_COLUMNS], names=CALL_COLUMNS)
    out = pa.BufferOutputStream()
    with ipc.new_stream(out, table.schema) as writer:
        writer.write_table(table)
    return bytes(out.getvalue().to_pybytes())
