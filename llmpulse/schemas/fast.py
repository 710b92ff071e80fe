"""A msgspec twin of CallEvent for the stream worker's hot path.

Decoding and validating a call with pydantic costs 5-8 us; the same checks in msgspec
cost about 1 us, which keeps decoding from dominating the worker. The twin accepts
exactly what CallEvent accepts (tests/test_fast_codec.py holds them to that); anything
it rejects is decoded again with pydantic, whose error says which field and why (a value
too large or nested too deeply included: never an exception out of the consumer).

Two of CallEvent's checks are made per message, not per event, where a Python call per
event cost more than the rest of the decode (about 0.5 us for the id pattern, which
msgspec runs through `re` for every string, and 0.3 us for a finiteness check in
`__post_init__`): the event ids of a message are checked in one pass over them all
(`_ids_ok`), and an infinite number is an out-of-range error of msgspec's JSON decoder
itself (it yields no inf or NaN), bounded again by `le` so that a twin never holds one.
"""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from llmpulse.schemas.base import SCHEMA_VERSION, new_event_id, utc_now
from llmpulse.schemas.call import CAPTURE_MAX_CHARS, CallEvent
from llmpulse.schemas.codec import MAX_VALUE_BYTES, Decoded, decode

_NonNegInt = Annotated[int, Meta(ge=0)]
_NonNegFloat = Annotated[float, Meta(ge=0, le=sys.float_info.max)]  # finite, as NonNegFloat
_Short = Annotated[str, Meta(max_length=128)]
_Long = Annotated[str, Meta(max_length=256)]


# gc=False: not tracked by the cycle collector (~0.2 us less per decoded event, and fewer
# collections): its fields are strings, numbers, booleans, None and a datetime, so an instance
# can never be part of a reference cycle
class CallEventFast(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, gc=False):
    model: Annotated[str, Meta(min_length=1, max_length=256)]
    schema_version: Annotated[int, Meta(ge=1, le=SCHEMA_VERSION)] = SCHEMA_VERSION
    # IdStr's pattern is matched per message by decode_calls (`_ids_ok`), not here per event
    event_id: Annotated[str, Meta(min_length=1, max_length=128)] = msgspec.field(default_factory=new_event_id)
    ts: Annotated[datetime, Meta(tz=True)] = msgspec.field(default_factory=utc_now)
    source: Literal["proxy", "sdk", "ingest", "otlp"] = "sdk"
    provider: _Short = "unknown"
    response_model: _Long | None = None
    operation: Literal["chat", "completion", "embedding", "responses", "other"] = "chat"
    app: _Short = "default"
    user: _Long | None = None
    api_key_hash: Annotated[str, Meta(max_length=128)] | None = None
    status_code: Annotated[int, Meta(ge=0, le=999)] = 200
    error_type: Annotated[str, Meta(max_length=64)] | None = None
    latency_ms: _NonNegFloat = 0.0
    ttft_ms: _NonNegFloat | None = None
    streamed: bool = False
    prompt_tokens: _NonNegInt = 0
    completion_tokens: _NonNegInt = 0
    total_tokens: _NonNegInt | None = None
    cached_tokens: _NonNegInt = 0
    reasoning_tokens: _NonNegInt = 0
    tokens_estimated: bool = False
    cost_usd: _NonNegFloat | None = None
    prompt: Annotated[str, Meta(max_length=CAPTURE_MAX_CHARS)] | None = None
    response: Annotated[str, Meta(max_length=CAPTURE_MAX_CHARS)] | None = None

    def __post_init__(self) -> None:
        if self.ts.tzinfo is not UTC:
            self.ts = self.ts.astimezone(UTC)
        if self.total_tokens is None:
            self.total_tokens = self.prompt_tokens + self.completion_tokens

    def to_model(self) -> CallEvent:
        return CallEvent.model_validate(msgspec.structs.asdict(self))


class _Batch(msgspec.Struct, forbid_unknown_fields=True):
    events: list[CallEventFast]
    schema_version: Annotated[int, Meta(ge=1, le=SCHEMA_VERSION)] = SCHEMA_VERSION


_single = msgspec.json.Decoder(CallEventFast)
_batch = msgspec.json.Decoder(_Batch)
_id_ok = re.compile(r"[A-Za-z0-9_.:\-]+").fullmatch
# the characters of the pattern's class
_ID_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-"


def _ids_ok(ids: list[str]) -> bool:
    r"""Whether every id matches IdStr's pattern (^[A-Za-z0-9_.:\-]+$, which pydantic matches to
    the end of the text; msgspec's min_length=1 has rejected an empty one): the ids joined by
    a space, which the pattern excludes, hold nothing but the pattern's characters and one
    space per joint. In one pass of bytes.translate (a table look-up per byte, about a third
    of a regex's time); `isascii` first, which is O(1), as every such character is ASCII."""
    joined = " ".join(ids)
    return joined.isascii() and joined.encode().translate(None, _ID_BYTES) == b" " * (len(ids) - 1)


def decode_calls(raw: bytes | None) -> Decoded[Any]:
    """Like codec.decode(raw, CallEvent), with msgspec twins as the valid items."""
    if raw is not None and len(raw) <= MAX_VALUE_BYTES:
        try:
            out: Decoded[Any] = Decoded()
            if raw.find(b'"events"', 0, 64) >= 0:
                events = _batch.decode(raw).events
                if events and not _ids_ok([e.event_id for e in events]):
                    raise msgspec.ValidationError("an event_id does not match its pattern")
                out.valid.extend(events)
            else:
                event = _single.decode(raw)
                if _id_ok(event.event_id) is None:
                    raise msgspec.ValidationError("event_id does not match its pattern")
                out.valid.append(event)
            return out
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            pass  # the pydantic path rejects it with the reason (depth and size included)
    return decode(raw, CallEvent)
