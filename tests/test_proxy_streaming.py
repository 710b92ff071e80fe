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
