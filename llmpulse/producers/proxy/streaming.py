"""Server-sent events through the proxy: whole events forwarded as they arrive.

`SseTap.feed()` takes the upstream's bytes and returns the complete events to send
on (a partial event waits for its end, nothing more is held). On the way it notes
the served model, the moment of the first generated token (time to first token),
and the usage, and hides the usage chunk (``choices: []``) that the proxy asked the
upstream for when the client did not. Only events that may matter are decoded:
those before the first token, those that carry a non-null ``usage``, and SSE
``error`` events. After the first token, a block of events without either passes
through as one bytes object, not split: the event payloads (for estimating tokens
when the upstream sent no usage, or for capture) are split out later, off the
request's path, by `payloads()`.

Anthropic Messages streams are read too: the served model and the input-side usage
from ``message_start``, the first ``content_block_delta`` as the first token, the
cumulative usage of ``message_delta`` merged over it (fields it leaves out keep their
``message_start`` values), and an ``error`` event (e.g. ``overloaded_error`` mid-stream)
as the call's error type. A payload nested too deeply to decode safely is passed on
untouched and not read (see `jsonlimits.py`): monitoring never breaks a stream.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from llmpulse.producers.proxy.jsonlimits import JsonLimitError, decode_bounded
from llmpulse.producers.proxy.tokens import Usage, anthropic_usage, delta_text, usage_from

_SEP = b"\n\n"
_ERROR_EVENTS = (b"event: error", b"event:error")


def payload_of(ev: bytes) -> bytes | None:
    """The data of one SSE event (multi-line data joined), or None (no data, empty, [DONE])."""
    i = ev.find(b"data:")
    if i < 0:
        return None
    payload = ev[i + 5 :].strip()
    if b"\ndata:" in payload:  # multi-line data: join the lines per the SSE rules
        payload = b"\n".join(ln[5:].strip() for ln in ev[i:].split(b"\n") if ln.startswith(b"data:"))
    if not payload or payload == b"[DONE]":
        return None
    return payload


def _event_start(block: bytes, pos: int, i: int) -> int:
    j = block.rfind(_SEP, pos, i)
    return j + 2 if j >= 0 else pos


def _usage_event(block: bytes, pos: int) -> int:
    """Where the first event at or after `pos` that may carry a non-null usage, or is an
    SSE ``error`` event, starts (len(block) when none does); `pos` is the start of an event."""
    found = len(block)
    i = block.find(b'"usage"', pos)
    while i >= 0:
        if not (block.startswith(b'"usage":null', i) or block.startswith(b'"usage": null', i)):
            found = _event_start(block, pos, i)
            break
        i = block.find(b'"usage"', i + 7)
    for marker in _ERROR_EVENTS:
        i = block.find(marker, pos, found)
        if i >= 0:
            found = _event_start(block, pos, i)
    return found


class SseTap:
    __slots__ = (
        "_anthropic_usage", "_blocks", "_buf", "error_type", "first_token_at", "hidden", "hide_usage",
        "response_model", "usage",
    )

    def __init__(self, hide_usage: bool) -> None:
        self._buf = b""
        self.hide_usage = hide_usage
        self.hidden = 0
        self.usage: Usage | None = None
        self.response_model: str | None = None
        self.first_token_at: float | None = None
        self.error_type: str | None = None  # an Anthropic stream's `error` event
        self._anthropic_usage: dict[str, Any] = {}  # message_start's usage, message_delta's merged in
        self._blocks: list[bytes] = []  # every complete block of events seen, as received

    def payloads(self) -> list[bytes]:
        """The data payloads of every event seen so far, in order (hidden ones included)."""
        out = []
        for block in self._blocks:
            for ev in block.split(_SEP):
                p = payload_of(ev)
                if p is not None:
                    out.append(p)
        return out

    def feed(self, data: bytes) -> bytes:
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        end = buf.rfind(_SEP)
        if end < 0:
            self._buf = buf
            return b""
        end += 2
        complete = buf[:end]
        self._buf = buf[end:]
        self._blocks.append(complete)
        kept: list[bytes] | None = None  # built only once an event is hidden
        pos, n = 0, len(complete)
        while pos < n:
            if self.first_token_at is not None:
                # after the first token only a usage matters: pass what precedes one on as is
                start = _usage_event(complete, pos)
                if start > pos:
                    if kept is not None:
                        kept.append(complete[pos:start])
                    pos = start
                    continue
            nxt = complete.find(_SEP, pos) + 2  # found: `complete` ends with one
            if self._watch(complete[pos : nxt - 2]):
                if kept is not None:
                    kept.append(complete[pos:nxt])
            elif kept is None:
                kept = [complete[:pos]]
            pos = nxt
        return complete if kept is None else b"".join(kept)

    def rest(self) -> bytes:
        """Whatever followed the last complete event when the stream ended."""
        buf, self._buf = self._buf, b""
        if buf:
            self._blocks.append(buf)
            if not self._watch(buf):
                return b""
        return buf

    def _watch(self, ev: bytes) -> bool:
        payload = payload_of(ev)
        if payload is None:
            return True
        if self.first_token_at is not None and (
            payload.find(b'"usage"') < 0 or payload.find(b'"usage":null') >= 0 or payload.find(b'"usage": null') >= 0
        ) and not ev.startswith(_ERROR_EVENTS) and b"\nevent: error" not in ev and b"\nevent:error" not in ev:
            return True
        try:
            chunk: Any = decode_bounded(payload)
        except (msgspec.DecodeError, JsonLimitError):
            return True
        if not isinstance(chunk, dict):
            return True
        ctype = chunk.get("type")
        if ctype in ("message_start", "message_delta", "error"):
            self._anthropic(ctype, chunk)
            return True
        resp = chunk.get("response")
        if self.response_model is None:
            m = chunk.get("model") or (resp.get("model") if isinstance(resp, dict) else None)
            if isinstance(m, str):
                self.response_model = m
        if self.first_token_at is None and (ctype == "content_block_delta" or delta_text(chunk)):
            self.first_token_at = time.perf_counter()
        u = chunk.get("usage")
        if u is None and isinstance(resp, dict):
            u = resp.get("usage")
        if isinstance(u, dict):
            self.usage = usage_from(u)
            if self.hide_usage and chunk.get("choices") == []:
                self.hidden += 1
                return False
        return True

    def _anthropic(self, ctype: str, chunk: dict[str, Any]) -> None:
        """message_start (model, usage), message_delta (cumulative usage), error."""
        if ctype == "error":
            err = chunk.get("error")
            etype = err.get("type") if isinstance(err, dict) else chunk.get("code")  # Anthropic; Responses
            self.error_type = etype[:64] if isinstance(etype, str) and etype else "stream_error"
            return
        if ctype == "message_start":
            msg = chunk.get("message")
            if not isinstance(msg, dict):
                return
            m = msg.get("model")
            if isinstance(m, str) and m:
                self.response_model = m
            u = msg.get("usage")
            if isinstance(u, dict):
                self._anthropic_usage = dict(u)
        else:
            u = chunk.get("usage")
            if isinstance(u, dict):
                self._anthropic_usage.update({k: v for k, v in u.items() if v is not None})
        if self._anthropic_usage:
            self.usage = anthropic_usage(self._anthropic_usage)
