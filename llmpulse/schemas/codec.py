"""The one place where wire models become Kafka bytes and back.

A message value is either one event (the model's JSON) or a batch envelope
``{"schema_version": N, "events": [...]}`` of events of one type. Decoding never
raises on bad input: each item is either a validated model or a ``Rejected`` with
the reason and the item's original bytes, ready for the dead-letter topic: a value
larger than `MAX_VALUE_BYTES` or nested deeper than `nesting.MAX_DEPTH` is such a
``Rejected`` too, never a RecursionError escaping the consumer.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from llmpulse.schemas.base import SCHEMA_VERSION, WireModel
from llmpulse.schemas.nesting import InputTooComplex, loads_json

try:  # msgspec parses JSON several times faster than the stdlib; the light SDK lacks it.
    import msgspec

    _json_loads: Callable[[bytes], Any] = msgspec.json.decode
    _json_dumps: Callable[[Any], bytes] = msgspec.json.encode
    _JSON_ERRORS: tuple[type[Exception], ...] = (msgspec.DecodeError, ValueError)
except ImportError:  # pragma: no cover - exercised by the light install only
    _json_loads = json.loads

    def _json_dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    _JSON_ERRORS = (ValueError,)

M = TypeVar("M", bound=WireModel)
MAX_BATCH_EVENTS = 100_000
MAX_VALUE_BYTES = 64 * 1024 * 1024
"""Far above any message a broker accepts by default (1 MiB); a bound on what one decode parses."""


@dataclass(slots=True)
class Rejected:
    reason: str
    raw: bytes


@dataclass(slots=True)
class Decoded(Generic[M]):
    valid: list[M] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


def encode(event: WireModel) -> bytes:
    return event.model_dump_json(exclude_none=True).encode()


def encode_batch(events: Sequence[WireModel]) -> bytes:
    """One message holding many events of one type (producers at high rates)."""
    body = b",".join(e.model_dump_json(exclude_none=True).encode() for e in events)
    return b'{"schema_version":%d,"events":[%s]}' % (SCHEMA_VERSION, body)


def describe_validation_error(exc: ValidationError) -> str:
    """`field 'a.b': message (got value)` for each error, joined by '; '."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(event)"
        got = err.get("input")
        shown = _short_repr(got)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        if err["type"] == "missing":
            parts.append(f"field '{loc}': required field is missing")
        elif err["type"] == "extra_forbidden":
            parts.append(f"field '{loc}': unknown field")
        else:
            parts.append(f"field '{loc}': {err['msg']} (got {shown})")
    return "; ".join(parts)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80


def _short_repr(value: Any) -> str:
    # reprlib stops at a few levels and items: an input's repr never recurses deeply or grows large.
    return _REPR.repr(value)


def validate_item(model: type[M], item: Any) -> M | str:
    """A validated model, or the reason it is invalid."""
    if not isinstance(item, dict):
        return f"event must be a JSON object, got {type(item).__name__}"
    try:
        return model.model_validate(item)
    except ValidationError as exc:
        return describe_validation_error(exc)


_envelopes: dict[type[WireModel], type[BaseModel]] = {}


def _envelope_of(model: type[M]) -> type[BaseModel]:
    env = _envelopes.get(model)
    if env is None:
        env = _envelopes[model] = _envelope(model)
    return env


def _envelope(model: type[M]) -> type[BaseModel]:
    return create_model(
        f"{model.__name__}Batch",
        __config__=ConfigDict(extra="forbid"),
        schema_version=(int, Field(ge=1, le=SCHEMA_VERSION)),
        events=(list[model], Field(max_length=MAX_BATCH_EVENTS)),  # type: ignore[valid-type]
    )


def decode(raw: bytes | None, model: type[M]) -> Decoded[M]:
    """Decode one message value: a single event or a batch envelope.

    The fast path validates the whole value in one pass of pydantic-core; only a
    value with an invalid item takes the slow path that sorts items one by one.
    """
    out: Decoded[M] = Decoded()
    if raw is None:
        out.rejected.append(Rejected("empty message value (null)", b""))
        return out
    if len(raw) > MAX_VALUE_BYTES:
        out.rejected.append(
            Rejected(f"message value of {len(raw)} bytes is larger than the {MAX_VALUE_BYTES} byte limit", raw)
        )
        return out
    try:
        if raw.find(b'"events"', 0, 64) >= 0:
            out.valid.extend(_envelope_of(model).model_validate_json(raw).events)  # type: ignore[attr-defined]
        else:
            out.valid.append(model.model_validate_json(raw))
        return out
    except ValidationError:
        out.valid.clear()
    try:
        obj = loads_json(raw, _json_loads)
    except InputTooComplex as exc:
        out.rejected.append(Rejected(f"JSON {exc}", raw))
        return out
    except _JSON_ERRORS as exc:
        out.rejected.append(Rejected(f"invalid JSON: {exc}", raw))
        return out
    if isinstance(obj, dict) and "events" in obj and "event_id" not in obj:
        items = obj["events"]
        version = obj.get("schema_version", SCHEMA_VERSION)
        if not isinstance(items, list):
            out.rejected.append(Rejected("field 'events': batch envelope needs a list", raw))
            return out
        if not isinstance(version, int) or version > SCHEMA_VERSION or version < 1:
            out.rejected.append(
                Rejected(f"field 'schema_version': unsupported version {version!r}", raw)
            )
            return out
        if len(items) > MAX_BATCH_EVENTS:
            out.rejected.append(
                Rejected(f"field 'events': more than {MAX_BATCH_EVENTS} events in one batch", raw)
            )
            return out
        for item in items:
            result = validate_item(model, item)
            if isinstance(result, str):
                out.rejected.append(Rejected(result, _json_dumps(item)))
            else:
                out.valid.append(result)
        return out
    result = validate_item(model, obj)
    if isinstance(result, str):
        out.rejected.append(Rejected(result, raw))
    else:
        out.valid.append(result)
    return out


def decode_one(raw: bytes, model: type[M]) -> M:
    """Decode a message that must hold exactly one valid event (internal topics)."""
    decoded = decode(raw, model)
    if decoded.rejected or len(decoded.valid) != 1:
        reason = decoded.rejected[0].reason if decoded.rejected else "expected one event"
        raise ValueError(f"cannot decode {model.__name__}: {reason}")
    return decoded.valid[0]
