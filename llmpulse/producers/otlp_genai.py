"""OpenTelemetry GenAI spans as CallEvents: the attribute mapping, one span at a time.

Guarantees: a span either becomes one CallEvent (source ``otlp``), is skipped with the
kind of span it is (not GenAI; an agent or tool span that is not a model call), or is
rejected with a reason that names the attribute at fault. Its `event_id` is derived from
the trace and span ids, so an exporter that retries, or a collector that sends the same
batch twice, is counted once downstream (rows keyed by `event_id`).

The failure it defends against: counting what the conventions do not say. Token counts
follow the conventions (`gen_ai.usage.input_tokens` includes cached input tokens, like
our `prompt_tokens`); when an instrumentation counted cache reads or writes apart (more
cache tokens than input tokens, as Anthropic's API reports them) they are added back, so
cost is never understated. Agent and tool spans (`invoke_agent`, `execute_tool`, ...)
carry their children's usage; counting them too would count tokens twice, so they are
skipped. Durations in attributes are seconds, as in the conventions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from llmpulse.producers.pricing import PriceTable
from llmpulse.schemas.call import CallEvent
from llmpulse.schemas.codec import validate_item

# Newest convention first, then the names older conventions and popular instrumentations
# (OpenLLMetry, OpenLIT, vLLM) use.
PROVIDER = ("gen_ai.provider.name", "gen_ai.system")
OPERATION = ("gen_ai.operation.name", "llm.request.type")
REQUEST_MODEL = ("gen_ai.request.model",)
RESPONSE_MODEL = ("gen_ai.response.model",)
INPUT_TOKENS = ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens", "llm.usage.prompt_tokens")
OUTPUT_TOKENS = ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens", "llm.usage.completion_tokens")
CACHE_READ_TOKENS = (
    "gen_ai.usage.cache_read.input_tokens",
    "gen_ai.usage.cache_read_input_tokens",
    "gen_ai.usage.cached_tokens",
)
CACHE_CREATION_TOKENS = ("gen_ai.usage.cache_creation.input_tokens", "gen_ai.usage.cache_creation_input_tokens")
REASONING_TOKENS = ("gen_ai.usage.reasoning.output_tokens", "gen_ai.usage.reasoning_tokens")
TTFT_SECONDS = (
    "gen_ai.response.time_to_first_chunk",
    "gen_ai.server.time_to_first_token",
    "gen_ai.response.time_to_first_token",
    "gen_ai.latency.time_to_first_token",
)
STREAMED = ("gen_ai.request.stream", "gen_ai.request.is_stream", "llm.is_streaming")
USER = ("user.id", "enduser.id", "gen_ai.request.user", "gen_ai.user.id", "langfuse.user.id", "llm.user")
HTTP_STATUS = ("http.response.status_code", "http.status_code")
ERROR_TYPE = ("error.type",)
APP = "service.name"
# Any of these marks a span as GenAI.
GENAI_MARKERS = (*PROVIDER, "gen_ai.operation.name", *REQUEST_MODEL, *RESPONSE_MODEL)

OPERATIONS: dict[str, str] = {
    "chat": "chat",
    "generate_content": "chat",
    "text_completion": "completion",
    "completion": "completion",
    "embeddings": "embedding",
    "embedding": "embedding",
    "responses": "responses",
}
NOT_MODEL_CALLS = frozenset({"invoke_agent", "create_agent", "execute_tool", "invoke_workflow"})
SPAN_ERROR = "span_error"
"""error_type of a span whose status is ERROR and that has no `error.type`."""


class Skipped(NamedTuple):
    kind: str  # "not_genai" | "not_a_model_call"


NOT_GENAI = Skipped("not_genai")
NOT_A_MODEL_CALL = Skipped("not_a_model_call")


class _Invalid(Exception):
    pass


def attributes(kvs: Sequence[KeyValue]) -> dict[str, Any]:
    """Scalar attributes only (str, int, float, bool); arrays and maps are not read."""
    out: dict[str, Any] = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        if which in ("string_value", "int_value", "double_value", "bool_value"):
            out[kv.key] = getattr(kv.value, which)
    return out


def event_id_of(trace_id: bytes, span_id: bytes) -> str:
    return f"otlp-{trace_id.hex()}-{span_id.hex()}"


def call_from_span(span: Span, resource: Mapping[str, Any], prices: PriceTable) -> CallEvent | Skipped | str:
    """The span's CallEvent, why it is skipped, or the reason it is invalid."""
    attrs = attributes(span.attributes)
    if not any(k in attrs for k in GENAI_MARKERS):
        return NOT_GENAI
    try:
        return _call(span, attrs, resource, prices)
    except _Invalid as exc:
        return str(exc)


def _call(span: Span, attrs: dict[str, Any], resource: Mapping[str, Any], prices: PriceTable) -> CallEvent | Skipped | str:
    op_name = _text(attrs, OPERATION)
    op_key = (op_name or "chat").strip().lower()
    if op_key in NOT_MODEL_CALLS:
        return NOT_A_MODEL_CALL
    if len(span.trace_id) != 16 or not any(span.trace_id):
        raise _Invalid("span trace_id: expected 16 bytes, not all zero")
    if len(span.span_id) != 8 or not any(span.span_id):
        raise _Invalid("span span_id: expected 8 bytes, not all zero")
    start, end = span.start_time_unix_nano, span.end_time_unix_nano
    if start == 0:
        raise _Invalid("span start_time_unix_nano: missing")
    if end < start:
        raise _Invalid(f"span end_time_unix_nano: before its start ({end} < {start})")

    request_model = _text(attrs, REQUEST_MODEL)
    response_model = _text(attrs, RESPONSE_MODEL)
    model = request_model or response_model
    if not model:
        raise _Invalid("attribute 'gen_ai.request.model': missing (and no gen_ai.response.model)")

    input_tokens = _count(attrs, INPUT_TOKENS)
    output_tokens = _count(attrs, OUTPUT_TOKENS)
    cache_read = _count(attrs, CACHE_READ_TOKENS) or 0
    cache_creation = _count(attrs, CACHE_CREATION_TOKENS) or 0
    reasoning = _count(attrs, REASONING_TOKENS) or 0
    prompt = input_tokens or 0
    if cache_read + cache_creation > prompt:  # counted apart from input (Anthropic's usage)
        prompt += cache_read + cache_creation
    completion = output_tokens or 0
    if reasoning > completion:
        completion += reasoning
    has_usage = input_tokens is not None or output_tokens is not None

    ttft_ms, streamed_by_chunks = _ttft_ms(span, attrs)
    status_code, error_type = _outcome(span, attrs)
    cost: float | None = None
    if has_usage:
        cost = _cost(prices, model, response_model, prompt, completion, cache_read, reasoning)

    fields: dict[str, Any] = {
        "event_id": event_id_of(span.trace_id, span.span_id),
        "ts": datetime.fromtimestamp(start / 1e9, UTC),
        "source": "otlp",
        "provider": (_text(attrs, PROVIDER) or "unknown").strip().lower(),
        "model": model,
        "response_model": response_model,
        "operation": OPERATIONS.get(op_key, "other"),
        "app": _text(resource, (APP,)) or "default",
        "user": _text(attrs, USER) or _text(resource, USER),
        "status_code": status_code,
        "error_type": error_type,
        "latency_ms": (end - start) / 1e6,
        "ttft_ms": ttft_ms,
        "streamed": streamed_by_chunks or any(attrs.get(k) is True for k in STREAMED),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": min(cache_read, prompt),
        "reasoning_tokens": min(reasoning, completion),
        "cost_usd": cost,
    }
    outcome = validate_item(CallEvent, {k: v for k, v in fields.items() if v is not None})
    if isinstance(outcome, str):
        return _with_origin(outcome)
    return outcome


# Which OTel name fed each CallEvent field, for reasons that name what the sender sent.
_ORIGIN = {
    "'app'": "resource attribute 'service.name'",
    "'user'": "attribute 'user.id' (or enduser.id, gen_ai.request.user)",
    "'provider'": "attribute 'gen_ai.provider.name' (or gen_ai.system)",
    "'model'": "attribute 'gen_ai.request.model'",
    "'response_model'": "attribute 'gen_ai.response.model'",
}


def _with_origin(reason: str) -> str:
    for field, origin in _ORIGIN.items():
        reason = reason.replace(f"field {field}:", f"field {field} (from {origin}):")
    return reason


def _text(attrs: Mapping[str, Any], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        value = attrs.get(key)
        if isinstance(value, str) and value.strip():
            return value
        if value is not None and not isinstance(value, str):
            raise _Invalid(f"attribute '{key}': expected a string, got {type(value).__name__} {value!r}")
    return None


def _count(attrs: Mapping[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        if key not in attrs:
            continue
        value = attrs[key]
        if isinstance(value, bool):
            raise _Invalid(f"attribute '{key}': expected a token count, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        elif isinstance(value, str) and value.strip().isdigit():
            value = int(value)  # some instrumentations send numbers as strings
        if not isinstance(value, int) or value < 0:
            raise _Invalid(f"attribute '{key}': expected a non-negative integer, got {value!r:.60}")
        return value
    return None


def _ttft_ms(span: Span, attrs: Mapping[str, Any]) -> tuple[float | None, bool]:
    """Time to first token in ms (attribute in seconds, else the first chunk event); streamed."""
    for key in TTFT_SECONDS:
        value = attrs.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise _Invalid(f"attribute '{key}': expected seconds (a non-negative number), got {value!r:.60}")
        return float(value) * 1000.0, False
    first: int | None = None
    for ev in span.events:
        name = ev.name.lower().replace("_", " ").replace(".", " ")
        is_first = ("first" in name and ("token" in name or "chunk" in name)) or name.endswith("chunk")
        t = ev.time_unix_nano
        if is_first and t >= span.start_time_unix_nano and (first is None or t < first):
            first = t
    if first is None:
        return None, False
    return (first - span.start_time_unix_nano) / 1e6, True


def _outcome(span: Span, attrs: Mapping[str, Any]) -> tuple[int, str | None]:
    status = _count(attrs, HTTP_STATUS)
    error = _text(attrs, ERROR_TYPE)
    if error is not None and status is None and error.isdigit() and len(error) == 3:
        status = int(error)  # error.type holds the HTTP status when that is all there was
    span_failed = span.status.code == Status.STATUS_CODE_ERROR
    if not span_failed and error is None:
        return (status if status is not None else 200), None
    # No HTTP status on a failed call: 0, as the SDK records an exception without a response.
    return (status if status is not None else 0), (error or SPAN_ERROR)[:64]


def _cost(
    prices: PriceTable, model: str, response_model: str | None, prompt: int, completion: int, cached: int, reasoning: int
) -> float | None:
    if prices.lookup(model) is None and response_model and prices.lookup(response_model) is not None:
        model = response_model  # e.g. requested through an alias, served as a priced model
    return prices.cost(model, prompt, completion, cached, reasoning)
