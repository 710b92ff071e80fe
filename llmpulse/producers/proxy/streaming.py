"""Server-sent events through the proxy: whole events forwarded as they arrive.

`SseTap.feed()` takes the upstream's bytes and returns the complete events to send
on (a partial event waits for its end, nothing more is held). On the way it notes
the served model, the moment of the first generated token (time to first token),
and the usage, and hides the usage chunk (``choices: []``) that the proxy asked the
upstream for when the client did not. Only events that may matter are decoded:
those before the first token, and those that carry a non-null ``usage``. After the
first token, a block of events without a usage passes through as one bytes object,
not split: the event payloads (for estimating tokens when the upstream sent no
usage, or for capture) are split out later, off the request's path, by `payloads()`.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from llmpulse.producers.proxy.tokens import Usage, delta_text, usage_from

_dec = msgspec.json.Decoder()
_SEP = b"\n\n"


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


def _usage_event(block: bytes, pos: int) -> int:
    """Where the first event at or after `pos` that may carry a non-null usage starts
    (len(block) when none does); `pos` is the start of an event."""
    i = block.find(b'"usage"', pos)
    while i >= 0:
        if not (block.startswith(b'"usage":null', i) or block.startswith(b'"usage": null', i)):
            return block.rfind(_SEP, pos, i) + 2 if block.rfind(_SEP, pos, i) >= 0 else pos
        i = block.find(b'"usage"', i + 7)
    return len(block)


class SseTap:
    __slots__ = ("_blocks", "_buf", "first_token_at", "hidden", "hide_usage", "response_model", "usage")

    def __init__(self, hide_usage: bool) -> None:
        self._buf = b""
        self.hide_usage = hide_usage
        self.hidden = 0
        self.usage: Usage | None = None
        self.response_model: str | None = None
        self.first_token_at: float | None = None
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
        ):
            return True
        try:
            chunk: Any = _dec.decode(payload)
        except msgspec.DecodeError:
            return True
        if not isinstance(chunk, dict):
            return True
        resp = chunk.get("response")
        if self.response_model is None:
            m = chunk.get("model") or (resp.get("model") if isinstance(resp, dict) else None)
            if isinstance(m, str):
                self.response_model = m
        if self.first_token_at is None and delta_text(chunk):
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
