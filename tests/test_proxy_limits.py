"""Bounded parsing in the proxy: deeply nested or oversized bodies get a clear 400/413 (or,
on paths the proxy need not read, are forwarded unread), never a 500 or a traceback; and
any other HTTP API behind the proxy is recorded under operation `other`."""

from __future__ import annotations

import json
import logging
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import msgspec
import pytest

from llmpulse.config import Settings
from llmpulse.producers.proxy.jsonlimits import (
    MAX_DEPTH,
    JsonLimitError,
    decode_bounded,
    depth_problem,
)
from llmpulse.producers.proxy.streaming import SseTap
from llmpulse.schemas.call import CallEvent
from tests.mock_servers import ListPublisher, Servers, upstream_settings

DEEP = 100_000


def _by_user(pub: ListPublisher, n: int, timeout: float = 15) -> dict[str | None, CallEvent]:
    deadline = time.monotonic() + timeout
    while len(pub.events()) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    events = {e.user: e for e in pub.events()}
    assert len(events) == n, events
    return events


def _nested(depth: int, closed: bool = True) -> bytes:
    return b"[" * depth + (b"]" * depth if closed else b"")


def test_depth_check_agrees_with_the_real_depth_and_ignores_brackets_in_strings() -> None:
    rng = random.Random(5)
    for _ in range(300):
        depth = rng.randint(1, 3 * MAX_DEPTH)
        value: object = rng.choice([1, "x", None])
        for _ in range(depth):
            value = [value] if rng.random() < 0.5 else {"k": value, "s": "]]}}\\\"[{" * rng.randint(0, 3)}
        data = json.dumps({"model": "m", "messages": value}).encode()
        too_deep = depth + 1 > MAX_DEPTH  # + the outer object
        assert (depth_problem(data) is not None) == too_deep, depth
        if not too_deep:
            assert decode_bounded(data) == json.loads(data)
    # brackets inside strings, escaped quotes and backslashes count for nothing
    tricky = json.dumps({"a": "[" * 5000, "b": '\\"' * 300 + "{" * 300, "c": "\\" * 7}).encode()
    assert depth_problem(tricky) is None and decode_bounded(tricky)["c"] == "\\" * 7
    for bad in (_nested(DEEP), _nested(DEEP, closed=False), b'{"a":' * DEEP):
        with pytest.raises(JsonLimitError, match=f"deeper than {MAX_DEPTH} levels"):
            decode_bounded(bad)
    with pytest.raises(msgspec.DecodeError):  # shallow but broken: the decoder's own error
        decode_bounded(b'{"a": [1, 2}')


def test_a_deeply_nested_stream_event_passes_through_unread() -> None:
    tap = SseTap(hide_usage=False)
    deep = b"data: " + _nested(DEEP) + b"\n\n"
    ok = b'data: {"model":"m","choices":[{"delta":{"content":"hi"}}]}\n\n'
    assert tap.feed(deep + ok) == deep + ok
    assert tap.first_token_at is not None and tap.response_model == "m"


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"content-type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_deep_or_oversized_json_gets_a_clear_answer_never_a_500(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    pub = ListPublisher()
    limit = 1 << 20
    settings = lambda url: make_settings(**upstream_settings(url), **{"proxy.max_body_bytes": limit})  # noqa: E731
    openai_h = {"Authorization": "Bearer sk-x"}
    anthropic_h = {"x-api-key": "sk-ant-x", "anthropic-version": "2023-06-01"}
    bodies = {
        "bare": _nested(DEEP, closed=False),
        "in messages": b'{"model":"gpt-4o","messages":' + _nested(DEEP) + b"}",
        "objects": b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    }
    with Servers(settings, publisher=pub) as s:
        answers = []
        for path, headers in (("/v1/chat/completions", openai_h), ("/v1/messages", anthropic_h)):
            for kind, body in bodies.items():
                user = {"X-LLMPulse-User": f"{path} {kind}"}
                answers.append((path, *_post(s.proxy.url + path, body, {**headers, **user})))
        assert s.mock.stats.requests == 0  # refused by the proxy, nothing forwarded
        # a path the proxy need not read (operation other): forwarded unread, the upstream answers
        other_status, other_body = _post(
            s.proxy.url + "/v1/vector_stores", bodies["in messages"], {**openai_h, "X-LLMPulse-User": "other"}
        )
        assert s.mock.stats.requests == 1 and s.mock.stats.by_path == {"/v1/vector_stores": 1}
        big_status, big_body = _post(
            s.proxy.url + "/v1/messages", b'{"model":"claude-haiku-4-5","x":"' + b"a" * limit + b'"}',
            {**anthropic_h, "X-LLMPulse-User": "big"},
        )
        events = _by_user(pub, 8)

    for path, status, body in answers:
        assert status == 400, (path, status, body)
        if path == "/v1/messages":  # Anthropic's error shape on the Anthropic route
            assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
            message = body["error"]["message"]  # type: ignore[index]
        else:
            assert body["error"]["type"] == "invalid_request"  # type: ignore[index]
            message = body["error"]["message"]  # type: ignore[index]
        assert f"nested deeper than {MAX_DEPTH} levels" in str(message)
    assert other_status == 400 and other_body["error"]["message"] == "invalid JSON body"  # type: ignore[index]
    assert big_status == 413 and str(limit) in big_body["error"]["message"]  # type: ignore[index]
    for path in ("/v1/chat/completions", "/v1/messages"):
        for kind in bodies:
            e = events[f"{path} {kind}"]
            assert (e.operation, e.status_code, e.error_type) == ("chat", 400, "invalid_request")
            assert e.provider == ("anthropic" if path == "/v1/messages" else "unknown")
    assert (events["other"].operation, events["other"].status_code) == ("other", 400)
    big = events["big"]
    assert (big.operation, big.provider, big.status_code, big.error_type) == ("chat", "anthropic", 413, "invalid_request")
    assert "Traceback" not in caplog.text and "Error handling request" not in caplog.text


def test_any_other_http_api_is_recorded_under_operation_other(make_settings: Callable[..., Settings]) -> None:
    """A self-hosted model service (e.g. a rerank or health API) behind a path prefix: each call
    is one event with its latency and status, so QPS, latency and errors are there too."""
    pub = ListPublisher()

    def settings_for(url: str) -> Settings:
        return make_settings(**{"proxy.upstreams": [
            {"name": "mock", "base_url": url},
            {"name": "local", "base_url": url, "provider": "vllm", "path_prefix": "/local"},
        ]})

    with Servers(settings_for, publisher=pub) as s:
        get = urllib.request.Request(s.proxy.url + "/local/v1/models", headers={"X-LLMPulse-User": "models"})
        ok = urllib.request.urlopen(get, timeout=10)
        assert ok.status == 200 and json.loads(ok.read())["object"] == "list"
        rerank_body = b'{"model":"bge-reranker","query":"q"}'
        status, _ = _post(s.proxy.url + "/local/v1/rerank", rerank_body, {"X-LLMPulse-User": "rerank"})
        assert status == 404  # the mock has no rerank API: the upstream's error, passed on
        status, _ = _post(s.proxy.url + "/v1/models/extra", b"not json at all", {"X-LLMPulse-User": "unknown"})
        events = _by_user(pub, 3)
    models, rerank, unknown = events["models"], events["rerank"], events["unknown"]
    assert (models.operation, models.provider, models.status_code, models.error_type) == ("other", "vllm", 200, None)
    assert (rerank.operation, rerank.model, rerank.status_code, rerank.error_type) == ("other", "bge-reranker", 404, "not_found")
    assert (unknown.operation, unknown.provider, unknown.status_code) == ("other", "openai", status)
    for e in events.values():
        assert e.latency_ms > 0 and e.cost_usd is None and e.prompt_tokens == 0 and not e.tokens_estimated
