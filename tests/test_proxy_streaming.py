"""The proxy's SSE tap: what it passes on, hides and notes, however the bytes are split."""

from __future__ import annotations

import json
import random
from typing import Any

from llmpulse.producers.proxy.streaming import SseTap


def _event(obj: dict[str, Any], compact: bool) -> bytes:
    sep = (",", ":") if compact else (", ", ": ")
    return b"data: " + json.dumps(obj, separators=sep).encode() + b"\n\n"


def _stream(rng: random.Random, n_tokens: int, usage_chunk: bool) -> tuple[list[bytes], bytes | None]:
    """OpenAI-style chat chunks: a role chunk, token chunks (usage null), maybe the usage
    chunk (choices: []), [DONE]; also a comment line. Returns (events, the usage event)."""
    compact = rng.random() < 0.5
    base = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini-2024", "usage": None}
    evs = [_event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}, compact)]
    evs += [
        _event({**base, "choices": [{"index": 0, "delta": {"content": f" word{i}"}}]}, compact)
        for i in range(n_tokens)
    ]
    evs.insert(rng.randint(1, len(evs)), b": keep-alive\n\n")
    usage = None
    if usage_chunk:
        u = {"prompt_tokens": 11, "completion_tokens": n_tokens, "total_tokens": 11 + n_tokens}
        usage = _event({**base, "choices": [], "usage": u}, compact)
        evs.append(usage)
    evs.append(b"data: [DONE]\n\n")
    return evs, usage


def _feed(tap: SseTap, data: bytes, rng: random.Random) -> bytes:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 8))))
    parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return b"".join(tap.feed(p) for p in parts) + tap.rest()


def test_tap_passes_events_on_hides_only_the_asked_usage_and_notes_usage_ttft_model() -> None:
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(1, 40)
        with_usage = rng.random() < 0.8
        evs, usage_ev = _stream(rng, n, with_usage)
        data = b"".join(evs)
        hide = rng.random() < 0.5

        tap = SseTap(hide)
        out = _feed(tap, data, rng)

        expected = data.replace(usage_ev, b"") if (hide and usage_ev) else data
        assert out == expected  # whole events, in order, nothing re-encoded
        assert tap.first_token_at is not None
        assert tap.response_model == "gpt-4o-mini-2024"
        if with_usage:
            assert tap.usage is not None
            assert (tap.usage.prompt_tokens, tap.usage.completion_tokens) == (11, n)
            assert tap.hidden == (1 if hide else 0)
        else:
            assert tap.usage is None and tap.hidden == 0
        # every data payload (for estimates and capture), [DONE] and comments left out
        payloads = tap.payloads()
        assert len(payloads) == 1 + n + (1 if with_usage else 0)
        assert all(p.startswith(b"{") for p in payloads)
        assert [json.loads(p)["choices"][0]["delta"]["content"] for p in payloads[1 : n + 1]] == [
            f" word{i}" for i in range(n)
        ]


def test_tap_crlf_multiline_data_and_a_tail_without_separator() -> None:
    tap = SseTap(hide_usage=False)
    first = b'data: {"model":"m","choices":[{"delta":{"content":"hi"}}]}\r\n\r\n'
    multi = b'data: {"model":"m",\r\ndata: "choices":[{"delta":{"content":"yo"}}]}\r\n\r\n'
    tail = b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3}}'
    out = tap.feed(first[:10]) + tap.feed(first[10:] + multi) + tap.feed(tail) + tap.rest()
    assert out == (first + multi).replace(b"\r\n", b"\n") + tail
    assert tap.usage is not None and (tap.usage.prompt_tokens, tap.usage.completion_tokens) == (2, 3)
    assert [json.loads(p).get("choices") for p in tap.payloads()][1] == [{"delta": {"content": "yo"}}]


def _anthropic_stream(rng: random.Random, n_tokens: int, error: str | None) -> list[bytes]:
    """Anthropic Messages SSE events, as the API sends them (event lines, pings, spacing varied)."""
    compact = rng.random() < 0.5

    def ev(name: str, data: dict[str, Any]) -> bytes:
        return b"event: " + name.encode() + b"\n" + _event({"type": name, **data}, compact)

    usage = {"input_tokens": 25, "cache_creation_input_tokens": 7, "cache_read_input_tokens": 100,
             "cache_creation": {"ephemeral_5m_input_tokens": 4, "ephemeral_1h_input_tokens": 3}, "output_tokens": 1}
    msg = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x-20250101", "content": [],
           "stop_reason": None, "stop_sequence": None, "usage": usage}
    evs = [ev("message_start", {"message": msg}),
           ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
           ev("ping", {})]
    for i in range(n_tokens):
        if error and i == n_tokens // 2:
            return [*evs, ev("error", {"error": {"type": error, "message": "Overloaded"}})]
        evs.append(ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": f" word{i}"}}))
    evs.append(ev("content_block_stop", {"index": 0}))
    # cumulative usage; some APIs resend the input side, others only output_tokens
    delta_usage: dict[str, Any] = {"output_tokens": n_tokens}
    if rng.random() < 0.5:
        delta_usage.update(input_tokens=25, cache_read_input_tokens=100, cache_creation_input_tokens=None)
    evs.append(ev("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": delta_usage}))
    evs.append(ev("message_stop", {}))
    return evs


def test_tap_reads_anthropic_streams_usage_merged_ttft_model_and_error_events() -> None:
    rng = random.Random(11)
    for _ in range(300):
        n = rng.randint(2, 40)
        error = "overloaded_error" if rng.random() < 0.3 else None
        data = b"".join(_anthropic_stream(rng, n, error))
        tap = SseTap(hide_usage=False)
        assert _feed(tap, data, rng) == data  # passed on whole and unchanged
        assert tap.first_token_at is not None and tap.response_model == "claude-x-20250101"
        assert tap.usage is not None
        u = tap.usage
        # prompt = uncached input + cache reads + cache writes; cached = the reads
        assert (u.prompt_tokens, u.cached_tokens, u.cache_write_tokens, u.cache_write_1h_tokens) == (132, 100, 7, 3)
        assert u.completion_tokens == (1 if error else n) and u.total_tokens == 132 + u.completion_tokens
        assert tap.error_type == error
