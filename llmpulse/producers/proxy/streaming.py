"""Server-sent events through the proxy: whole events forwarded as they arrive.

`SseTap.feed()` takes the upstream's bytes and returns the complete events to send
on (a partial event waits for its end, nothing more is held). On the way it notes
the served model, the moment of the first generated token (time to first token),
and the usage, and hides the usage chunk (``choices: []``) that the proxy asked the
upstream for when the client did not. Only events that may matter are decoded:
those before the first token, and those that carry a non-null ``usage``.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from llmpulse.producers.proxy.tokens import Usage, delta_text, usage_from

_dec = msgspec.json.Decoder()
_SEP = b"\n\n"


class SseTap:
    __slots__ = ("_buf", "first_token_at", "hidden", "hide_usage", "payloads", "response_model", "usage")

    def __init__(self, hide_usage: bool) -> None:
        self._buf = b""
        self.hide_usage = hide_usage
        self.hidden = 0
        self.usage: Usage | None = None
        self.response_model: str | None = None
        self.first_token_at: float | None = None
        self.payloads: list[bytes] = []

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
        events = complete.split(_SEP)
        events.pop()  # the empty piece after the last separator
        keep = [self._watch(ev) for ev in events]
        if all(keep):
            return complete
        return b"".join(ev + _SEP for ev, k in zip(events, keep, strict=True) if k)

    def rest(self) -> bytes:
        """Whatever followed the last complete event when the stream ended."""
        buf, self._buf = self._buf, b""
        if buf and not self._watch(buf):
            return b""
        return buf

    def _watch(self, ev: bytes) -> bool:
        i = ev.find(b"data:")
        if i < 0:
            return True
        payload = ev[i + 5 :].strip()
        if b"\ndata:" in payload:  # multi-line data: join the lines per the SSE rules
            payload = b"\n".join(
                ln[5:].strip() for ln in ev[i:].split(b"\n") if ln.startswith(b"data:")
            )
        if not payload or payload == b"[DONE]":
            return True
        self.payloads.append(payload)
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
