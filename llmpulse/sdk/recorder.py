"""Record calls made with any library: `llmpulse.record(...)` or `with llmpulse.recorder(...)`.

    import llmpulse
    llmpulse.record(model="claude-3-5-haiku", provider="anthropic", prompt_tokens=812,
                    completion_tokens=95, latency_ms=640, api_key=key)

    with llmpulse.recorder(model="claude-3-5-haiku", provider="anthropic", api_key=key) as call:
        msg = anthropic_client.messages.create(...)
        call.usage(prompt_tokens=msg.usage.input_tokens, completion_tokens=msg.usage.output_tokens)

Cost comes from the same price table as the proxy's, the API key becomes the same
keyed hash. Recording never raises into the app: a bad argument is logged and dropped.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from pydantic import ValidationError

from llmpulse.schemas import CallEvent
from llmpulse.schemas.codec import describe_validation_error
from llmpulse.sdk.background import SdkRuntime, runtime

log = logging.getLogger("llmpulse.sdk")


def build_event(rt: SdkRuntime, **fields: Any) -> CallEvent:
    """A CallEvent with the runtime's app, the key hashed, cost priced and text captured."""
    api_key = fields.pop("api_key", None)
    prompt = fields.pop("prompt", None)
    response = fields.pop("response", None)
    if api_key and not fields.get("api_key_hash"):
        fields["api_key_hash"] = rt.hasher.hash(str(api_key))
    if not fields.get("app"):
        fields["app"] = rt.app
    if not fields.get("provider"):
        fields["provider"] = rt.provider or "unknown"
    fields.setdefault("source", "sdk")
    if rt.redactor is not None:
        fields["prompt"] = rt.redactor.capture(prompt, rt.capture.max_chars)
        fields["response"] = rt.redactor.capture(response, rt.capture.max_chars)
    event = CallEvent(**{k: v for k, v in fields.items() if v is not None})
    if event.cost_usd is None:
        event.cost_usd = rt.prices.cost(
            event.model,
            event.prompt_tokens,
            event.completion_tokens,
            event.cached_tokens,
            event.reasoning_tokens,
        )
    return event


def record(
    *,
    model: str,
    provider: str | None = None,
    operation: str = "chat",
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    total_tokens: int | None = None,
    cached_tokens: int = 0,
    reasoning_tokens: int = 0,
    latency_ms: float = 0.0,
    ttft_ms: float | None = None,
    streamed: bool = False,
    status_code: int = 200,
    error_type: str | None = None,
    app: str | None = None,
    user: str | None = None,
    api_key: str | None = None,
    response_model: str | None = None,
    ts: datetime | None = None,
    cost_usd: float | None = None,
    tokens_estimated: bool = False,
    prompt: str | None = None,
    response: str | None = None,
    event_id: str | None = None,
) -> CallEvent | None:
    """Record one call; returns the event queued, or None when it was invalid (logged)."""
    fields = {k: v for k, v in locals().items()}
    try:
        rt = runtime()
        event = build_event(rt, **fields)
    except ValidationError as exc:
        log.warning("llmpulse.record: call not recorded: %s", describe_validation_error(exc))
        return None
    except Exception as exc:
        log.warning("llmpulse.record: call not recorded: %s", exc)
        return None
    rt.submit(event)
    return event


class Recorder:
    """Times one call; records it on exit (errors included, with the exception's status)."""

    def __init__(self, model: str, **fields: Any) -> None:
        self.fields: dict[str, Any] = {"model": model, **fields}
        self._t0 = time.perf_counter()
        self._ts = datetime.now(UTC)
        self._ttft: float | None = None
        self.event: CallEvent | None = None

    def __enter__(self) -> Recorder:
        self._t0 = time.perf_counter()
        self._ts = datetime.now(UTC)
        return self

    def first_token(self) -> None:
        """Mark the first streamed token (sets ttft_ms and streamed)."""
        if self._ttft is None:
            self._ttft = (time.perf_counter() - self._t0) * 1000
            self.fields["streamed"] = True

    def usage(
        self,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cached_tokens: int = 0,
        reasoning_tokens: int = 0,
        total_tokens: int | None = None,
    ) -> None:
        self.fields.update(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=cached_tokens,
            reasoning_tokens=reasoning_tokens,
            total_tokens=total_tokens,
        )

    def set(self, **fields: Any) -> None:
        """Any other CallEvent field (response_model, user, status_code, prompt, response...)."""
        self.fields.update(fields)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and self.fields.get("error_type") is None:
            status = getattr(exc, "status_code", None) or getattr(exc, "status", None)
            self.fields["status_code"] = status if isinstance(status, int) else 0
            self.fields["error_type"] = type(exc).__name__[:64]
        self.fields.setdefault("latency_ms", (time.perf_counter() - self._t0) * 1000)
        self.fields.setdefault("ts", self._ts)
        if self._ttft is not None:
            self.fields.setdefault("ttft_ms", self._ttft)
        self.event = record(**self.fields)


def recorder(model: str, **fields: Any) -> Recorder:
    """`with llmpulse.recorder(model=..., provider=..., api_key=...) as call: ...`"""
    return Recorder(model, **fields)
