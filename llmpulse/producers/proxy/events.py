"""From a finished request to a CallEvent on Kafka; nothing here can fail a user's request.

The handler fills a `CallRecord` (plain attribute writes) and hands it to
`CallRecorder.record()`, which estimates tokens when the upstream sent no usage, prices
the call, redacts captured text, validates the CallEvent and hands its JSON to a
`KeyedBatcher` (batching.py). The batcher writes it to the publisher's in-flight log
(durable against the death of the process from then on) and publishes one batch
envelope per model every `proxy.batch_max_events` events or `proxy.batch_linger_ms`
(non-blocking). `close()` (the proxy's stop path) publishes what is still buffered.

Guarantee: a call the proxy answered has its event in the in-flight log before the
answer leaves (a plain response is written after the handler returns; a streamed one
is recorded after its last byte, before the handler returns). Before, `record()` only
queued the record for a ``loop.call_soon`` flush, which ran after aiohttp had written
the response: a SIGKILL between the two lost an answered call's event. The price is
the encoding (about 20 us) before a plain response leaves instead of after.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client import Counter

from llmpulse.config import Settings
from llmpulse.producers.pricing import PriceTable
from llmpulse.producers.proxy.batching import KeyedBatcher
from llmpulse.producers.proxy.batching import RawPublisher as RawPublisher  # re-exported
from llmpulse.producers.proxy.jsonlimits import DECODE_ERRORS, decode_bounded
from llmpulse.producers.proxy.streaming import SseTap
from llmpulse.producers.proxy.tokens import (
    Usage,
    delta_text,
    estimate_usage,
    request_text,
    response_text,
)
from llmpulse.producers.redaction import Redactor
from llmpulse.schemas.call import CallEvent

log = logging.getLogger(__name__)

UNPRICED_CALLS = Counter("llmpulse_proxy_unpriced_calls_total", "Calls of models without a price")
EVENTS_NOT_BUILT = Counter("llmpulse_proxy_events_invalid_total", "Calls whose CallEvent could not be built")
KNOWN_OPS = frozenset({"chat", "completion", "embedding", "responses"})
_PARTIAL_OK = frozenset({"client_disconnected", "upstream_disconnected"})


@dataclass(slots=True)
class CallRecord:
    ts: datetime
    model: str
    operation: str
    provider: str
    app: str
    user: str | None
    api_key_hash: str | None
    streamed: bool = False
    status_code: int = 200
    error_type: str | None = None
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    response_model: str | None = None
    usage: Usage | None = None
    request_raw: bytes | None = None
    response_raw: bytes | None = None
    anthropic: bool = False  # an Anthropic Messages call (error bodies and types in Anthropic's shape)
    stream: SseTap | None = field(default=None)  # a streamed response's events (payloads() on demand)
    charge: list[Any] | None = field(default=None)  # rate limits (enforce.Limit) to charge tokens to


def _cut(v: str | None, n: int) -> str | None:
    return v if v is None or len(v) <= n else v[:n]


class CallRecorder:
    def __init__(self, settings: Settings, publisher: RawPublisher, prices: PriceTable) -> None:
        self.topic = settings.kafka.topic("calls")
        self.publisher = publisher
        self.prices = prices
        self.capture = settings.capture.enabled
        self.capture_max = settings.capture.max_chars
        self.redactor = Redactor(settings.capture.extra_patterns)
        cfg = settings.proxy
        self.batcher = KeyedBatcher(
            publisher, self.topic, max_events=cfg.batch_max_events, linger_s=cfg.batch_linger_ms / 1000
        )
        self.recorded = 0
        self.invalid = 0

    def record(self, rec: CallRecord) -> None:
        """Build the call's event and hand it to the batcher now, before the answer leaves:
        deferred (it was, by ``call_soon``), a SIGKILL after the answer lost it."""
        try:
            value = self.encode(rec)
        except Exception as exc:  # monitoring never fails the proxy
            self.invalid += 1
            EVENTS_NOT_BUILT.inc()
            log.warning("call event not built (%s): %s", rec.model, exc)
            return
        self.batcher.add(rec.model, value)
        self.recorded += 1

    def close(self) -> None:
        """Publish every buffered event (the proxy's stop path)."""
        self.batcher.close()

    # ---- the deferred work ----

    def _request_body(self, rec: CallRecord) -> dict[str, Any] | None:
        if not rec.request_raw:
            return None
        try:
            body = decode_bounded(rec.request_raw)
        except DECODE_ERRORS:
            return None
        return body if isinstance(body, dict) else None

    def _completion_text(self, rec: CallRecord) -> str:
        if rec.stream is not None:
            parts = []
            for p in rec.stream.payloads():
                try:
                    chunk = decode_bounded(p)
                except DECODE_ERRORS:
                    continue
                if isinstance(chunk, dict):
                    parts.append(delta_text(chunk))
            return "".join(parts)
        if rec.response_raw:
            try:
                body = decode_bounded(rec.response_raw)
            except DECODE_ERRORS:
                return ""
            if isinstance(body, dict):
                return response_text(body)
        return ""

    def encode(self, rec: CallRecord) -> bytes:
        usage = rec.usage
        ok = rec.status_code < 400 or rec.error_type in _PARTIAL_OK
        req_body: dict[str, Any] | None = None
        completion: str | None = None
        if usage is None and ok and rec.operation in KNOWN_OPS:
            req_body = self._request_body(rec)
            completion = self._completion_text(rec)
            usage = estimate_usage(req_body, completion)
        cost: float | None = None
        if usage is not None:
            cost = self.prices.cost(
                rec.model, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.reasoning_tokens,
                usage.cache_write_tokens, usage.cache_write_1h_tokens,
            )
            if cost is None:
                UNPRICED_CALLS.inc()
        u = usage or Usage()
        if rec.charge:
            spent = u.total_tokens if u.total_tokens is not None else u.prompt_tokens + u.completion_tokens
            for lim in rec.charge:
                lim.tokens.charge(spent)
        prompt_text = response_text_out = None
        if self.capture:
            if req_body is None:
                req_body = self._request_body(rec)
            if completion is None:
                completion = self._completion_text(rec)
            prompt_text = self.redactor.capture(request_text(req_body) if req_body else None, self.capture_max)
            response_text_out = self.redactor.capture(completion or None, self.capture_max)
        event = CallEvent(
            ts=rec.ts,
            source="proxy",
            provider=_cut(rec.provider, 128) or "unknown",
            model=_cut(rec.model, 256) or "unknown",
            response_model=_cut(rec.response_model, 256),
            operation=rec.operation,  # type: ignore[arg-type]
            app=_cut(rec.app, 128) or "default",
            user=_cut(rec.user, 256),
            api_key_hash=rec.api_key_hash,
            status_code=rec.status_code,
            error_type=rec.error_type,
            latency_ms=rec.latency_ms,
            ttft_ms=rec.ttft_ms,
            streamed=rec.streamed,
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            total_tokens=u.total_tokens if u.total_tokens is not None else u.prompt_tokens + u.completion_tokens,
            cached_tokens=u.cached_tokens,
            reasoning_tokens=u.reasoning_tokens,
            tokens_estimated=u.estimated,
            cost_usd=cost,
            prompt=prompt_text,
            response=response_text_out,
        )
        return event.model_dump_json(exclude_none=True).encode()
