"""The worker's msgspec twin of CallEvent accepts exactly what the pydantic model accepts."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from llmpulse.schemas import CallEvent, decode, encode, encode_batch
from llmpulse.schemas.fast import CallEventFast, decode_calls

GOOD = {"event_id": "e1", "model": "gpt-4o", "ts": "2026-01-01T10:00:00+02:00", "prompt_tokens": 3, "completion_tokens": 4,
        "latency_ms": 12.5, "cost_usd": 0.001, "user": "u", "api_key_hash": "hk_1", "status_code": 503,
        "error_type": "upstream_5xx", "ttft_ms": 3.0, "streamed": True}  # fmt: skip
BAD = [
    {"model": "gpt-4o", "prompt_tokens": -1},
    {"model": "gpt-4o", "prompt_tokens": "many"},
    {"model": "gpt-4o", "ts": "2026-01-01T00:00:00"},
    {"prompt_tokens": 1},
    {"model": ""},
    {"model": "gpt-4o", "unknown_field": 1},
    {"model": "gpt-4o", "status_code": 1000},
    {"model": "gpt-4o", "source": "carrier-pigeon"},
    {"model": "gpt-4o", "event_id": "has spaces"},
    {"model": "gpt-4o", "event_id": "ends-in-a-newline\n"},  # `$` of a re.search would pass it
    {"model": "gpt-4o", "latency_ms": -0.5},
    {"model": "x" * 300},
    {"model": "gpt-4o", "app": "a" * 200},
]
BAD_RAW = [b'{"model": "gpt-4o", "latency_ms": 1e400}', b"{not json", b"null", b"[1, 2]"]


def test_valid_events_decode_to_the_same_values() -> None:
    raw = json.dumps(GOOD).encode()
    fast = decode_calls(raw).valid[0]
    slow = decode(raw, CallEvent).valid[0]
    assert isinstance(fast, CallEventFast)
    assert fast.to_model() == slow
    assert fast.ts == datetime(2026, 1, 1, 8, 0, tzinfo=UTC) and fast.ts.tzinfo is UTC
    assert fast.total_tokens == 7


@pytest.mark.parametrize("item", BAD)
def test_invalid_events_are_rejected_with_pydantic_reasons(item: dict[str, object]) -> None:
    raw = json.dumps(item).encode()
    slow = decode(raw, CallEvent)
    assert slow.rejected, item
    fast = decode_calls(raw)
    assert fast.valid == [] and [r.reason for r in fast.rejected] == [r.reason for r in slow.rejected]


def test_batches_and_mixed_batches() -> None:
    evs = [CallEvent(model=f"m{i}", prompt_tokens=i) for i in range(10)]
    out = decode_calls(encode_batch(evs))
    assert [e.to_model() for e in out.valid] == evs
    mixed = json.dumps({"schema_version": 1, "events": [json.loads(encode(evs[0])), BAD[0]]}).encode()
    out = decode_calls(mixed)
    assert len(out.valid) == 1 and len(out.rejected) == 1 and "prompt_tokens" in out.rejected[0].reason
    # the ids of a batch are matched in one pass: one bad id among good ones is still named
    for bad_id in ("a b", "", "x\n", "ok.id:1 "):
        items = [json.loads(encode(e)) for e in evs[:3]]
        items[1]["event_id"] = bad_id
        raw = json.dumps({"schema_version": 1, "events": items}).encode()
        out, slow = decode_calls(raw), decode(raw, CallEvent)
        assert len(out.valid) == 2 and [r.reason for r in out.rejected] == [r.reason for r in slow.rejected]
        assert "event_id" in out.rejected[0].reason


@pytest.mark.parametrize("raw", BAD_RAW)
def test_invalid_raw_values_are_rejected_alike(raw: bytes) -> None:
    slow = decode(raw, CallEvent)
    fast = decode_calls(raw)
    assert slow.rejected and fast.valid == []
    assert [r.reason for r in fast.rejected] == [r.reason for r in slow.rejected]


def test_nested_and_oversized_values_are_rejected_with_reasons_not_raised() -> None:
    from llmpulse.schemas.codec import MAX_VALUE_BYTES

    deep = b"[" * 100_000 + b"]" * 100_000
    deep_field = b'{"model": "gpt-4o", "user": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    deep_batch = b'{"schema_version": 1, "events": [' + b"{" * 3 + b'"a": ' + b"[" * 100 + b"]" * 100 + b"}]}"
    for raw, reason in [
        (deep, "JSON nested deeper than 64 levels"),
        (deep_field, "JSON nested deeper than 64 levels"),
        (deep_batch, "invalid JSON"),  # '{{{' is not JSON at all
        (b'{"schema_version": 1, "events": [{"model": "m", "user": ' + b"[" * 70 + b"]" * 70 + b"}]}",
         "JSON nested deeper than 64 levels (at 'events.0.user.0.0.0.0.0...')"),
        (b'{"model": "' + b"x" * MAX_VALUE_BYTES + b'"}', f"larger than the {MAX_VALUE_BYTES} byte limit"),
    ]:  # fmt: skip
        for decoded in (decode(raw, CallEvent), decode_calls(raw)):
            assert decoded.valid == [] and len(decoded.rejected) == 1
            assert reason in decoded.rejected[0].reason and decoded.rejected[0].raw == raw
    # a deep value within the parser's own limit is named by its field, and its repr stays short
    out = decode(b'{"model": "gpt-4o", "user": ' + b"[" * 60 + b"]" * 60 + b"}", CallEvent)
    assert out.rejected[0].reason.startswith("field 'user': Input should be a valid string (got [[[")
    assert len(out.rejected[0].reason) < 200


@pytest.mark.parametrize(
    "bad_id", ["has spaces", "tab\there", "é-accented", "nbsp\u00a0", "nul\x00", "slash/", "plus+", "trailing\n", "ÿ"]
)
def test_a_batch_with_one_bad_event_id_is_rejected_as_pydantic_rejects_it(bad_id: str) -> None:
    """The ids of a batch are checked in one pass (fast._ids_ok): one bad id among good ones,
    first, in the middle or last, is rejected as CallEvent's pattern rejects it (the batch
    decoded again by pydantic: the good events kept, the bad one a dead letter)."""
    good = [{**GOOD, "event_id": f"ok-{i}.a:b_C"} for i in range(3)]
    for at in range(4):
        items = [*good[:at], {**GOOD, "event_id": bad_id}, *good[at:]]
        raw = json.dumps({"schema_version": 1, "events": items}).encode()
        fast, slow = decode_calls(raw), decode(raw, CallEvent)
        assert len(slow.rejected) == 1
        assert [e.event_id for e in fast.valid] == [e.event_id for e in slow.valid] == [g["event_id"] for g in good]
        assert [r.reason for r in fast.rejected] == [r.reason for r in slow.rejected]
