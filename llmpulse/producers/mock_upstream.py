"""A mock model server (OpenAI-compatible and Anthropic Messages) for the demo, the
tests and the benchmark.

Serves ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``,
``/v1/responses``, Anthropic's ``/v1/messages`` (each streamed or not, as the body
asks) and ``/v1/models``. OpenAI streams send one SSE chunk per token and, when
``stream_options.include_usage`` is set, the final usage chunk (``choices: []``) as
OpenAI does.

``/v1/messages`` answers as Anthropic does: the Message object, or the SSE events
``message_start`` (model and input-side usage), ``content_block_start``, ``ping``,
one ``content_block_delta`` per token, ``content_block_stop``, ``message_delta``
(stop reason, ``output_tokens``) and ``message_stop``; errors as
``{"type": "error", "error": {"type": ..., "message": ...}}`` with Anthropic's types
(429 ``rate_limit_error`` with ``retry-after``, 529 ``overloaded_error``, 400
``invalid_request_error``, ...). It requires ``model``, ``max_tokens`` and
``messages`` (400 otherwise) and an API key (``x-api-key`` or ``Authorization``;
401 otherwise). ``input_tokens`` leaves the cache reads and writes out, as Anthropic's do.

Options (`MockOptions`) set the latency before the first byte, the delay between
stream chunks, the error rate and status, and the token sizes. A request may
override them with headers: ``x-mock-status``, ``x-mock-latency-ms``,
``x-mock-chunk-delay-ms``, ``x-mock-tokens`` (completion tokens),
``x-mock-cached-tokens``, ``x-mock-reasoning-tokens``, ``x-mock-no-usage: 1`` (also on
``/v1/messages``: no ``usage`` anywhere, as some Messages-compatible gateways); for
``/v1/messages`` also ``x-mock-cache-read-tokens``, ``x-mock-cache-write-tokens``,
``x-mock-cache-write-1h-tokens`` (the part of the writes to the 1-hour cache),
``x-mock-served-model`` (the model the response names, e.g. a dated snapshot of an
alias) and ``x-mock-stream-error: <anthropic error type>`` (an SSE ``error`` event
halfway through the stream, which then ends).

In-process: ``mock = await start_mock_upstream("127.0.0.1", 0)``, ``mock.base_url``,
``mock.stats`` (requests, disconnects seen mid-stream, last headers), ``await mock.stop()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()
WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")


@dataclass
class MockOptions:
    latency_ms: float = 0.0
    chunk_delay_ms: float = 0.0
    error_rate: float = 0.0
    error_status: int = 500
    completion_tokens: int = 16
    embedding_dim: int = 8
    seed: int | None = None


@dataclass
class MockStats:
    requests: int = 0
    by_path: dict[str, int] = field(default_factory=dict)
    streams_completed: int = 0
    disconnects: int = 0
    errors: int = 0
    last_headers: dict[str, str] = field(default_factory=dict)
    last_body: dict[str, Any] = field(default_factory=dict)


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    out: list[str] = []
    if isinstance(value, list):
        for item in value:
            out.extend(_texts(item))
    elif isinstance(value, dict):
        for k in ("content", "text", "input"):
            if k in value:
                out.extend(_texts(value[k]))
    return out


def prompt_tokens_of(body: dict[str, Any]) -> int:
    """The mock's (deterministic) prompt token count: 1 per 4 characters, at least 1."""
    chars = 0
    for k in ("system", "messages", "prompt", "input"):
        if k in body:
            chars += sum(len(t) for t in _texts(body[k]))
    return max(1, chars // 4)


ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def _anthropic_error(status: int, message: str, etype: str | None = None) -> web.Response:
    etype = etype or ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    headers = {"retry-after": "1"} if status == 429 else None
    body = {"type": "error", "error": {"type": etype, "message": message}, "request_id": f"req_{uuid.uuid4().hex[:16]}"}
    return web.Response(status=status, body=_enc.encode(body), content_type="application/json", headers=headers)


def _error(status: int, message: str, etype: str = "server_error") -> web.Response:
    return web.Response(
        status=status,
        body=_enc.encode({"error": {"message": message, "type": etype, "param": None, "code": None}}),
        content_type="application/json",
    )


class MockUpstream:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, options: MockOptions | None = None) -> None:
        self.host = host
        self.port = port
        self.options = options or MockOptions()
        self.stats = MockStats()
        self._rng = random.Random(self.options.seed)
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL (with /v1)."""
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> MockUpstream:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/mock/stats", self._stats)
        app.router.add_post("/v1/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024, reuse_address=True)
        await site.start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "mock"} for m in ("gpt-4o-mini", "mock-model")]
        return web.json_response({"object": "list", "data": data})

    async def _stats(self, request: web.Request) -> web.Response:
        s = self.stats
        return web.json_response(
            {"requests": s.requests, "disconnects": s.disconnects, "streams_completed": s.streams_completed,
             "errors": s.errors, "by_path": s.by_path}
        )

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        s = self.stats
        s.requests += 1
        path = request.path
        s.by_path[path] = s.by_path.get(path, 0) + 1
        s.last_headers = dict(request.headers)
        h = request.headers
        o = self.options
        anthropic = path == "/v1/messages"
        fail = _anthropic_error if anthropic else _error
        try:
            body = _dec.decode(await request.read())
        except (msgspec.DecodeError, RecursionError):
            return fail(400, "invalid JSON body", "invalid_request_error")
        if not isinstance(body, dict):
            return fail(400, "body must be a JSON object", "invalid_request_error")
        s.last_body = body
        latency = float(h.get("x-mock-latency-ms", o.latency_ms))
        if latency > 0:
            await asyncio.sleep(latency / 1000)
        status = int(h.get("x-mock-status", 0))
        if not status and o.error_rate > 0 and self._rng.random() < o.error_rate:
            status = o.error_status
        if status >= 400:
            s.errors += 1
            return fail(status, f"mock error {status}")
        model = str(body.get("model") or "mock-model")
        n_out = int(h.get("x-mock-tokens", o.completion_tokens))
        usage = {
            "prompt": prompt_tokens_of(body),
            "completion": n_out,
            "cached": int(h.get("x-mock-cached-tokens", 0)),
            "reasoning": int(h.get("x-mock-reasoning-tokens", 0)),
            "omit": h.get("x-mock-no-usage") == "1",
        }
        delay = float(h.get("x-mock-chunk-delay-ms", o.chunk_delay_ms)) / 1000
        tail = path[len("/v1/"):]
        stream = bool(body.get("stream"))
        if anthropic:
            return await self._messages(request, body, n_out, delay)
        if tail == "embeddings":
            return self._embeddings(body, model, usage)
        if tail == "chat/completions":
            if stream:
                return await self._stream_chat(request, body, model, usage, delay)
            return self._chat(model, usage)
        if tail == "completions":
            if stream:
                return await self._stream_completion(request, body, model, usage, delay)
            return self._completion(model, usage)
        if tail == "responses":
            if stream:
                return await self._stream_responses(request, model, usage, delay)
            return web.Response(body=_enc.encode(self._response_obj(model, usage)), content_type="application/json")
        return _error(404, f"unknown path {path}", "invalid_request_error")

    # ---- Anthropic Messages ----

    async def _messages(
        self, request: web.Request, body: dict[str, Any], n_out: int, delay: float
    ) -> web.StreamResponse:
        h = request.headers
        if not (h.get("x-api-key") or h.get("Authorization")):
            self.stats.errors += 1
            return _anthropic_error(401, "x-api-key header is required")
        missing = [k for k in ("model", "max_tokens", "messages") if k not in body]
        if missing:
            self.stats.errors += 1
            return _anthropic_error(400, f"{missing[0]}: Field required")
        model = str(h.get("x-mock-served-model") or body["model"])
        written = int(h.get("x-mock-cache-write-tokens", 0))
        written_1h = min(written, int(h.get("x-mock-cache-write-1h-tokens", 0)))
        usage: dict[str, Any] = {
            "input_tokens": prompt_tokens_of(body),
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": int(h.get("x-mock-cache-read-tokens", 0)),
            "cache_creation": {"ephemeral_5m_input_tokens": written - written_1h, "ephemeral_1h_input_tokens": written_1h},
            "output_tokens": n_out,
            "service_tier": "standard",
        }
        words = self._words(n_out)
        msg: dict[str, Any] = {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": " ".join(words)}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
        omit = h.get("x-mock-no-usage") == "1"  # as a Messages-compatible gateway without usage
        if omit:
            del msg["usage"]
        if not body.get("stream"):
            return web.Response(body=_enc.encode(msg), content_type="application/json")

        def ev(name: str, data: dict[str, Any]) -> bytes:
            return b"event: " + name.encode() + b"\ndata: " + _enc.encode({"type": name, **data}) + b"\n\n"

        start = {**msg, "content": [], "stop_reason": None}
        if not omit:
            start["usage"] = {**usage, "output_tokens": 1}
        deltas = [
            ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": (" " if i else "") + w}})
            for i, w in enumerate(words)
        ]
        fault = h.get("x-mock-stream-error")
        if fault:
            deltas = deltas[: len(deltas) // 2]
            deltas.append(ev("error", {"error": {"type": fault, "message": f"mock {fault}"}}))
            self.stats.errors += 1
        events = [
            ev("message_start", {"message": start}),
            ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
            ev("ping", {}),
            *deltas,
        ]
        if not fault:
            events += [
                ev("content_block_stop", {"index": 0}),
                ev("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                     **({} if omit else {"usage": {"output_tokens": n_out}})}),
                ev("message_stop", {}),
            ]
        resp = await self._open_stream(request)
        await self._send(resp, events, delay)
        return resp

    # ---- bodies ----

    @staticmethod
    def _words(n: int) -> list[str]:
        return [WORDS[i % len(WORDS)] for i in range(n)]

    @staticmethod
    def _usage(u: dict[str, Any]) -> dict[str, Any]:
        p, c = u["prompt"], u["completion"]
        return {
            "prompt_tokens": p,
            "completion_tokens": c,
            "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": u["cached"]},
            "completion_tokens_details": {"reasoning_tokens": u["reasoning"]},
        }

    def _chat(self, model: str, u: dict[str, Any]) -> web.Response:
        obj: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": " ".join(self._words(u["completion"]))},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
        }
        if not u["omit"]:
            obj["usage"] = self._usage(u)
        return web.Response(body=_enc.encode(obj), content_type="application/json")

    def _completion(self, model: str, u: dict[str, Any]) -> web.Response:
        obj: dict[str, Any] = {
            "id": f"cmpl-{uuid.uuid4().hex[:12]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "text": " ".join(self._words(u["completion"])), "finish_reason": "stop", "logprobs": None}],
        }
        if not u["omit"]:
            obj["usage"] = self._usage(u)
        return web.Response(body=_enc.encode(obj), content_type="application/json")

    def _embeddings(self, body: dict[str, Any], model: str, u: dict[str, Any]) -> web.Response:
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else [inputs]
        dim = self.options.embedding_dim
        data = [
            {"object": "embedding", "index": i, "embedding": [round(((i + 1) * (j + 1) % 97) / 97, 4) for j in range(dim)]}
            for i in range(len(items))
        ]
        obj: dict[str, Any] = {"object": "list", "data": data, "model": model}
        if not u["omit"]:
            obj["usage"] = {"prompt_tokens": u["prompt"], "total_tokens": u["prompt"]}
        return web.Response(body=_enc.encode(obj), content_type="application/json")

    def _response_obj(self, model: str, u: dict[str, Any], rid: str | None = None) -> dict[str, Any]:
        text = " ".join(self._words(u["completion"]))
        obj: dict[str, Any] = {
            "id": rid or f"resp_{uuid.uuid4().hex[:12]}",
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed",
            "model": model,
            "output": [
                {
                    "type": "message",
                    "id": "msg_1",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
        }
        if not u["omit"]:
            p, c = u["prompt"], u["completion"]
            obj["usage"] = {
                "input_tokens": p,
                "input_tokens_details": {"cached_tokens": u["cached"]},
                "output_tokens": c,
                "output_tokens_details": {"reasoning_tokens": u["reasoning"]},
                "total_tokens": p + c,
            }
        return obj

    # ---- streams ----

    async def _open_stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        return resp

    async def _send(self, resp: web.StreamResponse, events: list[bytes], delay: float) -> bool:
        """Write events one by one; False when the client went away (counted)."""
        try:
            for i, ev in enumerate(events):
                if delay > 0 and i:
                    await asyncio.sleep(delay)
                await resp.write(ev)
            await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            self.stats.disconnects += 1
            return False
        self.stats.streams_completed += 1
        return True

    async def _stream_chat(
        self, request: web.Request, body: dict[str, Any], model: str, u: dict[str, Any], delay: float
    ) -> web.StreamResponse:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and not u["omit"]
        cid = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            obj: dict[str, Any] = {
                "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }
            if include_usage:
                obj["usage"] = None
            return b"data: " + _enc.encode(obj) + b"\n\n"

        words = self._words(u["completion"])
        events = [chunk({"role": "assistant", "content": ""}, None)]
        events += [chunk({"content": (" " if i else "") + w}, None) for i, w in enumerate(words)]
        events.append(chunk({}, "stop"))
        if include_usage:
            last = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [], "usage": self._usage(u)}
            events.append(b"data: " + _enc.encode(last) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        resp = await self._open_stream(request)
        await self._send(resp, events, delay)
        return resp

    async def _stream_completion(
        self, request: web.Request, body: dict[str, Any], model: str, u: dict[str, Any], delay: float
    ) -> web.StreamResponse:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and not u["omit"]
        cid = f"cmpl-{uuid.uuid4().hex[:12]}"
        created = int(time.time())
        events = []
        words = self._words(u["completion"])
        for i, w in enumerate(words):
            obj: dict[str, Any] = {
                "id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": (" " if i else "") + w, "logprobs": None,
                             "finish_reason": "stop" if i == len(words) - 1 else None}],
            }
            if include_usage:
                obj["usage"] = None
            events.append(b"data: " + _enc.encode(obj) + b"\n\n")
        if include_usage:
            last = {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [], "usage": self._usage(u)}
            events.append(b"data: " + _enc.encode(last) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        resp = await self._open_stream(request)
        await self._send(resp, events, delay)
        return resp

    async def _stream_responses(
        self, request: web.Request, model: str, u: dict[str, Any], delay: float
    ) -> web.StreamResponse:
        rid = f"resp_{uuid.uuid4().hex[:12]}"
        final = self._response_obj(model, u, rid)
        started = {**final, "status": "in_progress", "output": []}
        started.pop("usage", None)
        seq = 0

        def ev(name: str, data: dict[str, Any]) -> bytes:
            nonlocal seq
            data = {"type": name, "sequence_number": seq, **data}
            seq += 1
            return b"event: " + name.encode() + b"\ndata: " + _enc.encode(data) + b"\n\n"

        events = [ev("response.created", {"response": started})]
        for i, w in enumerate(self._words(u["completion"])):
            events.append(ev("response.output_text.delta", {
                "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": (" " if i else "") + w}))
        events.append(ev("response.completed", {"response": final}))
        resp = await self._open_stream(request)
        await self._send(resp, events, delay)
        return resp


async def start_mock_upstream(
    host: str = "127.0.0.1", port: int = 0, options: MockOptions | None = None, **kwargs: Any
) -> MockUpstream:
    """Start the mock on host:port (0 = a free port) in the running event loop.

    `kwargs` are MockOptions fields (latency_ms, chunk_delay_ms, error_rate, ...).
    """
    opts = options or MockOptions(**kwargs)
    return await MockUpstream(host, port, opts).start()


def run_mock_upstream(host: str, port: int, options: MockOptions, ready: Any = None) -> None:
    """Serve until interrupted (the `llmpulse mock-upstream` command)."""

    async def main() -> None:
        mock = await start_mock_upstream(host, port, options)
        if ready is not None:
            ready(mock)
        try:
            await asyncio.Event().wait()
        finally:
            await mock.stop()

    from llmpulse.producers.proxy.loop import run

    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        run(main())
