"""Non-streamed requests: send, retry with backoff on connection errors and 502/503/504,
keep the circuit breaker informed."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping

import aiohttp

from llmpulse.producers.proxy.errors import RETRY_STATUSES, is_retryable_exception
from llmpulse.producers.proxy.upstreams import Upstream


class CircuitOpenError(Exception):
    pass


def backoff_s(up: Upstream, attempt: int) -> float:
    """Exponential backoff with jitter: base * 2^attempt, capped, times 0.5-1.0."""
    base = min(up.cfg.retry_backoff_max_s, up.cfg.retry_backoff_s * (2**attempt))
    return float(base * (0.5 + random.random() / 2))


async def send(
    up: Upstream,
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    retries: int,
) -> tuple[aiohttp.ClientResponse, bytes, float, int]:
    """(response, its body, seconds spent on the upstream incl. backoff, attempts).

    Raises CircuitOpenError when the breaker fails fast, or the last exception.
    """
    assert up.session is not None
    spent = 0.0
    attempt = 0
    while True:
        if not up.circuit.allow():
            raise CircuitOpenError(up.name)
        t = time.perf_counter()
        try:
            resp = await up.session.request(method, url, headers=headers, data=body or None)
            try:
                raw = await resp.read()
            finally:
                resp.release()
        except asyncio.CancelledError:
            up.circuit.release()
            raise
        except Exception as exc:
            spent += time.perf_counter() - t
            up.circuit.failure()
            if attempt < retries and is_retryable_exception(exc):
                pause = backoff_s(up, attempt)
                await asyncio.sleep(pause)
                spent += pause
                attempt += 1
                continue
            raise
        spent += time.perf_counter() - t
        if resp.status in RETRY_STATUSES:
            up.circuit.failure()
            if attempt < retries:
                pause = backoff_s(up, attempt)
                await asyncio.sleep(pause)
                spent += pause
                attempt += 1
                continue
        else:
            up.circuit.success()
        return resp, raw, spent, attempt + 1
