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
"""

from __future__ import annotations

import asyncio
import errno

import aiohttp
import msgspec

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
