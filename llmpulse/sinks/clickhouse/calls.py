"""The sink's hot path for calls: msgspec decoding and column-oriented Arrow inserts.

pydantic's CallEvent stays the authority on what is valid. Decoding uses the msgspec
twin in llmpulse.schemas.fast; any message it refuses is decoded again by pydantic,
which keeps its valid events and drops the invalid ones (the worker dead-letters those). Rows become Arrow columns in C; costs are rounded to nano-USD
integers in Arrow and written as Decimal(18, 9) without a Python Decimal per row.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from llmpulse.schemas.fast import CallEventFast
from llmpulse.schemas.fast import decode_calls as decode_fast

# The worker's msgspec twin of CallEvent serves the sink too (one definition, held to
# CallEvent's rules by tests/test_fast_codec.py). `CallStruct` is its name here.
CallStruct = CallEventFast


def decode_calls(raw: bytes | None) -> tuple[list[Any], int]:
    """(events, invalid count): CallEventFast objects, or CallEvents where pydantic had to judge."""
    decoded = decode_fast(raw)
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


def _col(events: list[Any], name: str) -> list[Any]:
    return list(map(attrgetter(name), events))  # all in C: ~20 % faster than a comprehension of getattr


def calls_arrow(events: list[Any]) -> bytes:
    """An Arrow IPC stream of the llm_calls columns (CALL_COLUMNS order)."""
    cols: dict[str, pa.Array] = {}
    for c in _STR:
        cols[c] = pa.array(_col(events, c), type=pa.string())
    raw = {c: pa.array(_col(events, c), type=pa.string()) for c in _STR_EMPTY}
    for c in _STR_EMPTY:
        cols[c] = pc.fill_null(raw[c], "")
    cols["ts"] = pa.array(_col(events, "ts"), type=pa.timestamp("us", tz="UTC"))
    status = pa.array(_col(events, "status_code"), type=pa.uint16())
    cols["status_code"] = status
    # CallEvent.is_error: an error type, or status 0 or >= 400
    failed = pc.or_(pc.greater_equal(status, pa.scalar(400, pa.uint16())), pc.equal(status, pa.scalar(0, pa.uint16())))
    cols["is_error"] = pc.or_(pc.is_valid(raw["error_type"]), failed).cast(pa.uint8())
    cols["latency_ms"] = pa.array(_col(events, "latency_ms"), type=pa.float64())
    cols["ttft_ms"] = pa.array(_col(events, "ttft_ms"), type=pa.float64())
    for c in ("streamed", "tokens_estimated"):
        cols[c] = pa.array(_col(events, c), type=pa.bool_())
    for c in _U32:
        cols[c] = pa.array(_col(events, c), type=pa.uint32())
    cols["cost_usd"] = _nano_usd(_col(events, "cost_usd"))
    for c in ("prompt", "response"):
        cols[c] = pa.array(_col(events, c), type=pa.string())
    table = pa.Table.from_arrays([cols[c] for c in CALL_COLUMNS], names=CALL_COLUMNS)
    out = pa.BufferOutputStream()
    with ipc.new_stream(out, table.schema) as writer:
        writer.write_table(table)
    return bytes(out.getvalue().to_pybytes())
