"""How a call failed: `status_code` and `error_type` of the CallEvent, and error bodies.

error_type values:

- from the upstream's HTTP status: ``invalid_request`` (400, 413, 422), ``auth`` (401),
  ``forbidden`` (403), ``not_found`` (404), ``timeout`` (408), ``rate_limited`` (429),
  ``client_error`` (other 4xx), ``upstream_error`` (5xx);
- found by the proxy: ``timeout`` (504: connect/read/total timeout), ``connection_refused``
  (502), ``connection_error`` (502: reset, DNS, TLS, ...), ``upstream_disconnected``
  (502: the upstream closed a stream before its end), ``circuit_open`` (503: failing fast
  while the upstream is down), ``invalid_request`` (400/413: body the proxy cannot read),
  ``client_disconnected`` (499: the client went away before the response ended);
- refused by an active llmpulse action: ``action_rate_limited`` (429 with Retry-After),
  ``action_blocked`` (403), ``action_circuit_open`` (503).

An Anthropic Messages call (``/v1/messages``) that failed upstream keeps Anthropic's
own type, read from its error body ``{"type": "error", "error": {"type": ...}}`` or
from an SSE ``error`` event mid-stream: ``rate_limit_error`` (429),
``overloaded_error`` (529), ``invalid_request_error`` (400), ``authentication_error``
(401), ``permission_error`` (403), ``not_found_error`` (404), ``request_too_large``
(413), ``api_error`` (500); without a readable body, the status mapping above. Errors
the proxy itself answers on that route (circuit open, unreadable body, ...) keep the
proxy's types, in an Anthropic-shaped body so that the `anthropic` client raises
its usual exceptions.
"""

from __future__ import annotations

import asyncio
import errno

import aiohttp
import msgspec

from llmpulse.producers.proxy.jsonlimits import DECODE_ERRORS, decode_bounded

CLIENT_CLOSED = 499
_BY_STATUS = {
    400: "invalid_request",
    401: "auth",
    403: "forbidden",
    404: "not_found",
    408: "timeout",
    413: "invalid_request",
    422: "invalid_request",
    429: "rate_limited",
}
RETRY_STATUSES = frozenset({502, 503, 504})
# Anthropic's error types and the HTTP status each comes with
ANTHROPIC_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
_ANTHROPIC_BY_STATUS = {v: k for k, v in ANTHROPIC_STATUS.items()}

TIMEOUT = "timeout"
CONNECTION_REFUSED = "connection_refused"
CONNECTION_ERROR = "connection_error"
UPSTREAM_DISCONNECTED = "upstream_disconnected"
CIRCUIT_OPEN = "circuit_open"
INVALID_REQUEST = "invalid_request"
CLIENT_DISCONNECTED = "client_disconnected"
# refused by an llmpulse action (issue 10): 429 + Retry-After, 403, 503
ACTION_RATE_LIMITED = "action_rate_limited"
ACTION_BLOCKED = "action_blocked"
ACTION_CIRCUIT_OPEN = "action_circuit_open"


def error_type_of_status(status: int) -> str | None:
    if status < 400:
        return None
    if status >= 500:
        return "upstream_error"
    return _BY_STATUS.get(status, "client_error")


def classify_exception(exc: BaseException) -> tuple[int, str]:
    """(status_code, error_type) of an exception raised talking to an upstream."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, aiohttp.ServerTimeoutError)):
        return 504, TIMEOUT
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_err = getattr(exc, "os_error", None)
        if isinstance(os_err, ConnectionRefusedError) or getattr(os_err, "errno", None) == errno.ECONNREFUSED:
            return 502, CONNECTION_REFUSED
        return 502, CONNECTION_ERROR
    if isinstance(exc, aiohttp.ClientPayloadError):
        return 502, UPSTREAM_DISCONNECTED
    return 502, CONNECTION_ERROR


def is_retryable_exception(exc: BaseException) -> bool:
    """Connection errors (the request may not have reached the upstream); not timeouts."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return False
    return isinstance(exc, (aiohttp.ClientConnectionError, ConnectionError))


def error_body(message: str, etype: str, code: str | None = None) -> bytes:
    """An OpenAI-shaped error body, so that OpenAI clients raise their usual errors."""
    return msgspec.json.encode(
        {"error": {"message": message, "type": etype, "param": None, "code": code or etype}}
    )


def anthropic_error_body(status: int, message: str) -> bytes:
    """An Anthropic-shaped error body: the type Anthropic uses for `status`, the
    proxy's reason in the message."""
    etype = _ANTHROPIC_BY_STATUS.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    return msgspec.json.encode({"type": "error", "error": {"type": etype, "message": message}})


class _AnthropicError(msgspec.Struct):
    type: str


class _AnthropicErrorBody(msgspec.Struct):
    error: _AnthropicError


_anthropic_err_dec = msgspec.json.Decoder(_AnthropicErrorBody)


def anthropic_error_type(raw: bytes) -> str | None:
    """`error.type` of an Anthropic error body, or None when `raw` is not one."""
    try:
        etype = decode_bounded(raw, _anthropic_err_dec).error.type
    except DECODE_ERRORS:
        return None
    return etype[:64] or None
