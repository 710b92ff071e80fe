"""Error classification, retries, timeouts, the circuit breaker, clients leaving mid-stream."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import aiohttp
import openai
import pytest

from llmpulse.config import Settings
from llmpulse.schemas.call import CallEvent
from tests.mock_servers import ListPublisher, Servers, upstream_settings

MESSAGES = [{"role": "user", "content": "hello"}]


def _wait(pub: ListPublisher, n: int, timeout: float = 15) -> list[CallEvent]:
    deadline = time.monotonic() + timeout
    while len(pub.events()) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    events = pub.events()
    assert len(events) == n, [e.error_type for e in events]
    return events


def test_upstream_statuses_retries_timeouts_invalid(make_settings: Callable[..., Settings]) -> None:
    pub = ListPublisher()
    up = {"retries": 2, "retry_backoff_s": 0.01, "read_timeout_s": 0.5, "circuit_failures": 100}
    with Servers(lambda url: make_settings(**upstream_settings(url, **up)), publisher=pub) as s:
        client = openai.OpenAI(base_url=s.base_url, api_key="sk-x", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers={"x-mock-status": "429"})  # type: ignore[arg-type]
        before = s.mock.stats.requests
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers={"x-mock-status": "503"})  # type: ignore[arg-type]
        assert s.mock.stats.requests - before == 3  # 1 + 2 retries
        before = s.mock.stats.requests
        with pytest.raises(openai.InternalServerError):  # streams are not retried
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True, extra_headers={"x-mock-status": "503"})  # type: ignore[arg-type]
        assert s.mock.stats.requests - before == 1
        with pytest.raises(openai.APIStatusError) as timeout:
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers={"x-mock-latency-ms": "2000"})  # type: ignore[arg-type]
        assert timeout.value.status_code == 504
        before = s.mock.stats.requests
        bad = urllib.request.Request(
            s.base_url + "/chat/completions", data=b"{not json", method="POST",
            headers={"Content-Type": "application/json", "Authorization": "Bearer sk-x"},
        )
        with pytest.raises(urllib.error.HTTPError) as invalid:
            urllib.request.urlopen(bad, timeout=10)
        assert invalid.value.code == 400
        assert s.mock.stats.requests == before  # rejected by the proxy, not forwarded
        events = _wait(pub, 5)
    got = [(e.status_code, e.error_type, e.streamed) for e in events]
    assert got == [
        (429, "rate_limited", False),
        (503, "upstream_error", False),
        (503, "upstream_error", False),
        (504, "timeout", False),
        (400, "invalid_request", False),
    ]
    assert all(e.cost_usd is None and e.prompt_tokens == 0 for e in events)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connection_refused_and_circuit_breaker(make_settings: Callable[..., Settings]) -> None:
    pub = ListPublisher()
    dead = f"http://127.0.0.1:{_closed_port()}/v1"
    up = {"retries": 1, "retry_backoff_s": 0.01, "circuit_failures": 2, "circuit_reset_s": 60}
    with Servers(lambda url: make_settings(**upstream_settings(dead, **up)), publisher=pub) as s:
        client = openai.OpenAI(base_url=s.base_url, api_key="sk-x", max_retries=0)
        for _ in range(3):
            with pytest.raises(openai.APIStatusError):
                client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
        health_state = s.proxy.router.upstreams[0].circuit.state
        events = _wait(pub, 3)
    assert [(e.status_code, e.error_type) for e in events] == [
        (502, "connection_refused"),  # two attempts: the circuit opens after them
        (503, "circuit_open"),
        (503, "circuit_open"),
    ]
    assert health_state == "open"


def test_client_disconnect_mid_stream_closes_the_upstream(make_settings: Callable[..., Settings]) -> None:
    pub = ListPublisher()
    with Servers(lambda url: make_settings(**upstream_settings(url)), publisher=pub) as s:

        async def leave_early() -> int:
            async with aiohttp.ClientSession() as http:
                resp = await http.post(
                    s.base_url + "/chat/completions",
                    json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
                    headers={"Authorization": "Bearer sk-x", "x-mock-tokens": "200", "x-mock-chunk-delay-ms": "20"},
                )
                got = 0
                async for _ in resp.content.iter_any():
                    got += 1
                    if got >= 3:
                        break
                resp.close()  # the client goes away mid-stream
                return got

        assert asyncio.run(leave_early()) == 3
        deadline = time.monotonic() + 10
        while s.mock.stats.disconnects < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.mock.stats.disconnects == 1  # the upstream saw its connection closed
        assert s.mock.stats.streams_completed == 0
        (e,) = _wait(pub, 1)
    assert (e.status_code, e.error_type, e.streamed) == (499, "client_disconnected", True)
    assert e.ttft_ms is not None and e.latency_ms < 200 * 20  # not the whole stream's time
    assert e.tokens_estimated and 0 < e.completion_tokens < 200  # what was generated until then
