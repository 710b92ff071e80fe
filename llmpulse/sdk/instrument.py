"""`llmpulse.instrument(client)`: every call of an official `openai` client becomes a CallEvent.

Wraps, on the given client instance (sync ``OpenAI`` or ``AsyncOpenAI``):
``chat.completions.create``, ``completions.create``, ``embeddings.create`` and
``responses.create``, streamed or not. Streams are wrapped so that the time to the
first token and the final usage are measured as the app reads them; for chat and
completion streams the SDK asks for the usage chunk (``stream_options.include_usage``)
when the app did not, and hides that extra chunk from the app. Without usage the
tokens are estimated (``tokens_estimated``). Errors are recorded and re-raised as is.

Not covered: ``client.with_options(...)`` copies made before ``instrument`` and the
``with_raw_response`` / ``with_streaming_response`` variants.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlparse

from llmpulse.sdk.background import SdkRuntime, runtime
from llmpulse.sdk.recorder import build_event

log = logging.getLogger("llmpulse.sdk")

C = TypeVar("C")

RESOURCES = (
    (("chat", "completions"), "chat"),
    (("completions",), "completion"),
    (("embeddings",), "embedding"),
    (("responses",), "responses"),
)
_ORIGINAL = "_llmpulse_original_create"

_PROVIDER_HOSTS = (
    ("openai.azure.com", "azure"),
    ("api.openai.com", "openai"),
    ("anthropic.com", "anthropic"),
    ("generativelanguage.googleapis.com", "google"),
    ("mistral.ai", "mistral"),
    ("groq.com", "groq"),
    ("together.xyz", "together"),
    ("openrouter.ai", "openrouter"),
    ("deepseek.com", "deepseek"),
    ("fireworks.ai", "fireworks"),
    ("x.ai", "xai"),
)


def guess_provider(base_url: str) -> str:
    host = (urlparse(base_url).hostname or "").lower()
    for suffix, name in _PROVIDER_HOSTS:
        if host == suffix or host.endswith("." + suffix) or host.endswith(suffix):
            return name
    if host in ("localhost", "127.0.0.1", "::1") or host.startswith(("10.", "192.168.")):
        return "self-hosted"
    return host or "unknown"


def _get(obj: Any, *path: str) -> Any:
    for name in path:
        if obj is None:
            return None
        obj = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
    return obj


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def _estimate_tokens(text: str) -> int:
    return (len(text) + 3) // 4 if text else 0


def _prompt_text(operation: str, kwargs: dict[str, Any]) -> str:
    if operation == "chat":
        parts = []
        for m in kwargs.get("messages") or []:
            content = _get(m, "content")
            if isinstance(content, list):
                content = " ".join(str(_get(c, "text") or "") for c in content)
            parts.append(f"{_get(m, 'role') or ''}: {content or ''}")
        return "\n".join(parts)
    value = kwargs.get("prompt") if operation == "completion" else kwargs.get("input")
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return str(value)


def _usage_fields(operation: str, usage: Any) -> dict[str, Any]:
    if usage is None:
        return {}
    if operation == "responses":
        return {
            "prompt_tokens": _int(_get(usage, "input_tokens")),
            "completion_tokens": _int(_get(usage, "output_tokens")),
            "total_tokens": _get(usage, "total_tokens"),
            "cached_tokens": _int(_get(usage, "input_tokens_details", "cached_tokens")),
            "reasoning_tokens": _int(_get(usage, "output_tokens_details", "reasoning_tokens")),
        }
    return {
        "prompt_tokens": _int(_get(usage, "prompt_tokens")),
        "completion_tokens": _int(_get(usage, "completion_tokens")),
        "total_tokens": _get(usage, "total_tokens"),
        "cached_tokens": _int(_get(usage, "prompt_tokens_details", "cached_tokens")),
        "reasoning_tokens": _int(_get(usage, "completion_tokens_details", "reasoning_tokens")),
    }


def _response_text(operation: str, resp: Any) -> str:
    if operation == "chat":
        return _first_choice(resp, "message", "content")
    if operation == "completion":
        return _first_choice(resp, "text")
    if operation == "responses":
        text = getattr(resp, "output_text", None)
        return text if isinstance(text, str) else ""
    return ""


def _first_choice(resp: Any, *path: str) -> str:
    choices = _get(resp, "choices")
    if not choices:
        return ""
    value = _get(choices[0], *path)
    return value if isinstance(value, str) else ""


def _error_fields(exc: BaseException) -> dict[str, Any]:
    status = getattr(exc, "status_code", None)
    name = type(exc).__name__
    if "Timeout" in name:
        kind = "timeout"
    elif "Connection" in name:
        kind = "connection"
    else:
        body = getattr(exc, "body", None)
        code = _get(body, "type") or _get(body, "code") if isinstance(body, dict) else None
        kind = str(code) if code else name
    return {"status_code": status if isinstance(status, int) else 0, "error_type": kind[:64]}


class _Call:
    """One call in flight: what is known at the start, completed from the response or stream."""

    def __init__(self, rt: SdkRuntime, operation: str, kwargs: dict[str, Any], meta: dict[str, Any]) -> None:
        self.rt = rt
        self.operation = operation
        self.kwargs = kwargs
        self.meta = meta
        self.t0 = time.perf_counter()
        self.ts = datetime.now(UTC)
        self.ttft_ms: float | None = None
        self.usage: dict[str, Any] = {}
        self.response_model: str | None = None
        self.text: list[str] = []
        self.done = False

    def _record(self, **fields: Any) -> None:
        if self.done:
            return
        self.done = True
        try:
            model = self.kwargs.get("model")
            user = self.kwargs.get("user") or self.kwargs.get("safety_identifier") or self.meta.get("user")
            base = {
                "model": str(model) if model else "unknown",
                "operation": self.operation,
                "provider": self.meta.get("provider"),
                "app": self.meta.get("app"),
                "user": user if isinstance(user, str) else None,
                "api_key": self.meta.get("api_key"),
                "ts": self.ts,
                "latency_ms": (time.perf_counter() - self.t0) * 1000,
                "ttft_ms": self.ttft_ms,
                "response_model": self.response_model,
                **self.usage,
                **fields,
            }
            capture = self.rt.redactor is not None
            if capture:
                base["prompt"] = _prompt_text(self.operation, self.kwargs)
                base.setdefault("response", "".join(self.text))
            if not self.usage and not fields.get("error_type") and self.operation != "embedding":
                base["prompt_tokens"] = _estimate_tokens(_prompt_text(self.operation, self.kwargs))
                base["completion_tokens"] = _estimate_tokens("".join(self.text))
                base["tokens_estimated"] = True
            self.rt.submit(build_event(self.rt, **base))
        except Exception as exc:
            log.warning("llmpulse: call not recorded: %s", exc)

    def fail(self, exc: BaseException, streamed: bool = False) -> None:
        self._record(streamed=streamed, **_error_fields(exc))

    def finish(self, resp: Any) -> None:
        try:
            self.response_model = _get(resp, "model")
            self.usage = _usage_fields(self.operation, _get(resp, "usage"))
            if self.rt.redactor is not None:
                self.text = [_response_text(self.operation, resp)]
        except Exception as exc:
            log.debug("llmpulse: cannot read the response: %s", exc)
        self._record(streamed=False, status_code=200)

    # -- streams ---------------------------------------------------------------------
    def on_chunk(self, chunk: Any, hide_usage: bool) -> bool:
        """Account one streamed chunk; False when it must be hidden from the app."""
        try:
            if self.operation == "responses":
                return self._on_event(chunk)
            model = _get(chunk, "model")
            if model:
                self.response_model = model
            usage = _get(chunk, "usage")
            if usage is not None:
                self.usage = _usage_fields(self.operation, usage)
            choices = _get(chunk, "choices") or []
            for choice in choices:
                piece = _get(choice, "delta", "content") if self.operation == "chat" else _get(choice, "text")
                if piece:
                    if self.ttft_ms is None:
                        self.ttft_ms = (time.perf_counter() - self.t0) * 1000
                    self.text.append(piece)
                elif self.ttft_ms is None and self.operation == "chat" and _get(choice, "delta", "tool_calls"):
                    self.ttft_ms = (time.perf_counter() - self.t0) * 1000
            return not (hide_usage and usage is not None and not choices)
        except Exception as exc:
            log.debug("llmpulse: cannot read a chunk: %s", exc)
            return True

    def _on_event(self, event: Any) -> bool:
        kind = _get(event, "type") or ""
        if kind == "response.output_text.delta":
            if self.ttft_ms is None:
                self.ttft_ms = (time.perf_counter() - self.t0) * 1000
            delta = _get(event, "delta")
            if isinstance(delta, str):
                self.text.append(delta)
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            resp = _get(event, "response")
            self.response_model = _get(resp, "model") or self.response_model
            self.usage = _usage_fields("responses", _get(resp, "usage")) or self.usage
            if kind == "response.failed":
                err = _get(resp, "error", "code")
                self._failed = str(err or "response_failed")
        return True

    def end_stream(self) -> None:
        failed = getattr(self, "_failed", None)
        if failed:
            self._record(streamed=True, status_code=200, error_type=failed[:64])
        else:
            self._record(streamed=True, status_code=200)


class InstrumentedStream:
    """Wraps an openai ``Stream``: same iteration and context manager, measured on the way."""

    def __init__(self, inner: Any, call: _Call, hide_usage: bool) -> None:
        self._inner = inner
        self._call = call
        self._hide = hide_usage

    def __iter__(self) -> InstrumentedStream:
        return self

    def __next__(self) -> Any:
        while True:
            try:
                chunk = next(self._inner)
            except StopIteration:
                self._call.end_stream()
                raise
            except Exception as exc:
                self._call.fail(exc, streamed=True)
                raise
            if self._call.on_chunk(chunk, self._hide):
                return chunk

    def __enter__(self) -> InstrumentedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._call.end_stream()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __del__(self) -> None:
        call = self.__dict__.get("_call")
        if call is not None and not call.done:
            call.end_stream()


class InstrumentedAsyncStream:
    """Wraps an openai ``AsyncStream``."""

    def __init__(self, inner: Any, call: _Call, hide_usage: bool) -> None:
        self._inner = inner
        self._call = call
        self._hide = hide_usage

    def __aiter__(self) -> InstrumentedAsyncStream:
        return self

    async def __anext__(self) -> Any:
        while True:
            try:
                chunk = await self._inner.__anext__()
            except StopAsyncIteration:
                self._call.end_stream()
                raise
            except Exception as exc:
                self._call.fail(exc, streamed=True)
                raise
            if self._call.on_chunk(chunk, self._hide):
                return chunk

    async def __aenter__(self) -> InstrumentedAsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        try:
            await self._inner.close()
        finally:
            self._call.end_stream()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __del__(self) -> None:
        call = self.__dict__.get("_call")
        if call is not None and not call.done:
            call.end_stream()


def _prepare(operation: str, kwargs: dict[str, Any]) -> tuple[bool, bool]:
    """(streamed, hide_usage); asks for the usage chunk of chat/completion streams."""
    streamed = kwargs.get("stream") is True
    hide = False
    if streamed and operation in ("chat", "completion"):
        opts = kwargs.get("stream_options")
        if not isinstance(opts, dict):
            kwargs["stream_options"] = {"include_usage": True}
            hide = True
        elif "include_usage" not in opts:
            kwargs["stream_options"] = {**opts, "include_usage": True}
            hide = True
    return streamed, hide


def _wrap_sync(original: Callable[..., Any], operation: str, meta: dict[str, Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def create(*args: Any, **kwargs: Any) -> Any:
        rt = runtime()
        if not rt.enabled:
            return original(*args, **kwargs)
        streamed, hide = _prepare(operation, kwargs)
        call = _Call(rt, operation, kwargs, meta)
        try:
            result = original(*args, **kwargs)
        except Exception as exc:
            call.fail(exc, streamed=streamed)
            raise
        if streamed:
            return InstrumentedStream(result, call, hide)
        call.finish(result)
        return result

    return create


def _wrap_async(original: Callable[..., Any], operation: str, meta: dict[str, Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def create(*args: Any, **kwargs: Any) -> Any:
        rt = runtime()
        if not rt.enabled:
            return await original(*args, **kwargs)
        streamed, hide = _prepare(operation, kwargs)
        call = _Call(rt, operation, kwargs, meta)
        try:
            result = await original(*args, **kwargs)
        except Exception as exc:
            call.fail(exc, streamed=streamed)
            raise
        if streamed:
            return InstrumentedAsyncStream(result, call, hide)
        call.finish(result)
        return result

    return create


def _resource(client: Any, path: tuple[str, ...]) -> Any:
    obj = client
    for name in path:
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def _is_async_client(client: Any) -> bool:
    try:
        import openai

        if isinstance(client, openai.AsyncOpenAI):
            return True
        if isinstance(client, openai.OpenAI):
            return False
    except ImportError:
        pass
    return type(client).__name__.startswith("Async")


def instrument(
    client: C, *, app: str | None = None, user: str | None = None, provider: str | None = None
) -> C:
    """Record every call made through `client` (in place; returns the same client).

    `app` overrides LLMPULSE_APP for this client, `user` is the default end user (a
    call's own `user=` / `safety_identifier=` wins), `provider` overrides the guess
    from the client's base URL. Instrumenting twice is harmless.
    """
    rt = runtime()
    meta: dict[str, Any] = {
        "app": app,
        "user": user,
        "provider": provider or rt.provider or guess_provider(str(getattr(client, "base_url", ""))),
        "api_key": getattr(client, "api_key", None) or None,
    }
    is_async = _is_async_client(client)
    for path, operation in RESOURCES:
        res = _resource(client, path)
        if res is None or not hasattr(res, "create"):
            continue
        original = res.__dict__.get(_ORIGINAL) or res.create
        wrap = _wrap_async if is_async or inspect.iscoroutinefunction(inspect.unwrap(original)) else _wrap_sync
        setattr(res, _ORIGINAL, original)
        res.create = wrap(original, operation, meta)
    return client


def uninstrument(client: C) -> C:
    """Undo `instrument(client)`."""
    for path, _ in RESOURCES:
        res = _resource(client, path)
        if res is not None and _ORIGINAL in res.__dict__:
            del res.__dict__["create"]
            del res.__dict__[_ORIGINAL]
    return client
