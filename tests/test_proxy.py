"""The proxy with the official OpenAI client against the mock upstream; events read from Kafka."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import openai
import pytest

from llmpulse.config import Settings
from llmpulse.embedded.broker import EmbeddedBroker
from llmpulse.producers.keyhash import KeyHasher, load_secret
from llmpulse.producers.mock_upstream import MockOptions, prompt_tokens_of
from llmpulse.producers.pricing import price_call
from llmpulse.schemas.call import CallEvent
from tests.kafkatools import read_messages
from tests.mock_servers import Servers, call_events, upstream_settings

API_KEY = "sk-test-RAWKEY-0123456789abcdefXYZ"
MESSAGES = [{"role": "user", "content": "Say something nice about Kafka and ClickHouse."}]


def _wait_events(bootstrap: str, settings: Settings, n: int) -> list[CallEvent]:
    msgs = read_messages(bootstrap, settings.kafka.topic("calls"), until=lambda ms: len(call_events(ms)) >= n, timeout=60)
    events = call_events(msgs)
    assert len(events) == n, f"expected {n} call events, got {len(events)}"
    return events


def test_openai_clients_sync_async_streamed_or_not(
    broker: EmbeddedBroker, make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with Servers(lambda url: make_settings(**upstream_settings(url)), mock_options=MockOptions(chunk_delay_ms=2)) as s:
        hdrs = {"X-LLMPulse-App": "checkout", "X-LLMPulse-User": "alice"}
        client = openai.OpenAI(base_url=s.base_url, api_key=API_KEY, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers=hdrs  # type: ignore[arg-type]
        )
        assert float(raw.headers["x-llmpulse-overhead-ms"]) >= 0
        plain = raw.parse()
        assert plain.usage is not None and plain.usage.completion_tokens == 16
        # the upstream got the client's key unchanged and none of the llmpulse headers
        assert s.mock.stats.last_headers["Authorization"] == f"Bearer {API_KEY}"
        assert not [k for k in s.mock.stats.last_headers if k.lower().startswith("x-llmpulse")]

        # streamed, the client did not ask for usage: it sees no usage chunk
        chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True, user="bob"))  # type: ignore[arg-type]
        assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
        assert s.mock.stats.last_body["stream_options"] == {"include_usage": True}  # asked upstream

        async def async_calls() -> tuple[Any, list[Any]]:
            aclient = openai.AsyncOpenAI(base_url=s.base_url, api_key=API_KEY, max_retries=0)
            r = await aclient.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
            stream = await aclient.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}  # type: ignore[arg-type]
            )
            got = [c async for c in stream]
            await aclient.close()
            return r, got

        async_plain, async_chunks = asyncio.run(async_calls())
        assert async_chunks[-1].choices == [] and async_chunks[-1].usage is not None  # asked: shown
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once upon a time")
        list(client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once upon a time", stream=True))
        emb = client.embeddings.create(model="text-embedding-3-small", input=["one text", "two texts"])
        resp = client.responses.create(model="gpt-4.1-mini", input="Tell me a story")
        list(client.responses.create(model="gpt-4.1-mini", input="Tell me a story", stream=True))
        client.models.list()  # any other path: forwarded, operation=other
        events = _wait_events(broker.bootstrap, s.settings, 10)
        assert s.proxy.recorder is not None and s.proxy.recorder.invalid == 0

    by = sorted(events, key=lambda e: e.ts)
    ops = [(e.operation, e.model, e.streamed) for e in by]
    assert ops == [
        ("chat", "gpt-4o-mini", False),
        ("chat", "gpt-4o-mini", True),
        ("chat", "gpt-4o", False),
        ("chat", "gpt-4o", True),
        ("completion", "gpt-3.5-turbo-instruct", False),
        ("completion", "gpt-3.5-turbo-instruct", True),
        ("embedding", "text-embedding-3-small", False),
        ("responses", "gpt-4.1-mini", False),
        ("responses", "gpt-4.1-mini", True),
        ("other", "unknown", False),
    ]
    prompt = prompt_tokens_of({"messages": MESSAGES})
    key_hash = KeyHasher(load_secret(s.settings.data_dir)).hash(API_KEY)
    for e in by:
        assert e.source == "proxy" and e.status_code == 200 and e.error_type is None
        assert e.api_key_hash == key_hash
        assert e.latency_ms > 0
        assert not e.tokens_estimated
        if e.operation in ("chat", "completion", "responses"):
            assert e.completion_tokens == 16
            assert e.cost_usd == pytest.approx(price_call(e.model, e.prompt_tokens, 16))
            assert e.cost_usd is not None and e.cost_usd > 0
            assert e.response_model == e.model
        if e.streamed:
            assert e.ttft_ms is not None and 0 < e.ttft_ms <= e.latency_ms
            assert e.latency_ms >= 16 * 2  # the mock's chunk delays
        else:
            assert e.ttft_ms is None
    chat = [e for e in by if e.operation == "chat"]
    assert [e.prompt_tokens for e in chat] == [prompt] * 4
    # streamed and non-streamed calls of the same content cost the same
    assert chat[0].cost_usd == chat[1].cost_usd and chat[2].cost_usd == chat[3].cost_usd
    assert async_plain.usage is not None and chat[2].prompt_tokens == async_plain.usage.prompt_tokens
    assert (chat[0].app, chat[0].user) == ("checkout", "alice")
    assert (chat[1].app, chat[1].user) == ("default", "bob")  # body `user`
    embedding = next(e for e in by if e.operation == "embedding")
    assert emb.usage.prompt_tokens == embedding.prompt_tokens and embedding.completion_tokens == 0
    assert embedding.cost_usd == pytest.approx(price_call("text-embedding-3-small", embedding.prompt_tokens, 0))
    responses = [e for e in by if e.operation == "responses"]
    assert resp.usage is not None and all(e.prompt_tokens == resp.usage.input_tokens for e in responses)
    other = next(e for e in by if e.operation == "other")
    assert other.model == "unknown" and other.cost_usd is None

    # the raw API key is nowhere: not in Kafka, not in the logs
    msgs = read_messages(broker.bootstrap, s.settings.kafka.topic("calls"), until=lambda ms: len(call_events(ms)) >= 10, timeout=30)
    for m in msgs:
        assert API_KEY.encode() not in (m.value() or b"") and API_KEY.encode() not in (m.key() or b"")
    assert API_KEY not in caplog.text


def test_usage_missing_tokens_are_estimated_and_unknown_models_unpriced(
    make_settings: Callable[..., Settings],
) -> None:
    from tests.mock_servers import ListPublisher

    pub = ListPublisher()
    with Servers(lambda url: make_settings(**upstream_settings(url)), publisher=pub) as s:
        client = openai.OpenAI(base_url=s.base_url, api_key=API_KEY, max_retries=0)
        nouse = {"x-mock-no-usage": "1"}
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_headers=nouse)  # type: ignore[arg-type]
        list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers=nouse))  # type: ignore[arg-type]
        client.chat.completions.create(model="acme-private-7b", messages=MESSAGES)  # type: ignore[arg-type]
        client.chat.completions.create(
            model="o3-mini", messages=MESSAGES,  # type: ignore[arg-type]
            extra_headers={"x-mock-cached-tokens": "4", "x-mock-reasoning-tokens": "10"},
        )
        deadline = time.monotonic() + 10
        while len(pub.events()) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        unknown = dict(s.proxy.prices.unknown)
    est, est_stream, unk, reasoning = pub.events()
    for e in (est, est_stream):
        assert e.tokens_estimated
        assert e.prompt_tokens > 0 and e.completion_tokens > 0
        assert e.cost_usd == pytest.approx(price_call("gpt-4o-mini", e.prompt_tokens, e.completion_tokens))
    # the same text estimated the same way, streamed or not
    assert (est.prompt_tokens, est.completion_tokens) == (est_stream.prompt_tokens, est_stream.completion_tokens)
    assert unk.cost_usd is None and not unk.tokens_estimated and unk.completion_tokens == 16
    assert unknown == {"acme-private-7b": 1}
    assert (reasoning.cached_tokens, reasoning.reasoning_tokens) == (4, 10)
    assert reasoning.cost_usd == pytest.approx(price_call("o3-mini", reasoning.prompt_tokens, 16, 4, 10))


def test_capture_redacts_and_metrics_and_health(make_settings: Callable[..., Settings]) -> None:
    from tests.mock_servers import ListPublisher

    pub = ListPublisher()
    secret_msg = [{"role": "user", "content": "mail me at jo@example.com, key sk-abcdefghijklmnop123456"}]
    with Servers(
        lambda url: make_settings(**upstream_settings(url), **{"capture.enabled": True, "capture.max_chars": 200}),
        publisher=pub,
    ) as s:
        client = openai.OpenAI(base_url=s.base_url, api_key=API_KEY, max_retries=0)
        client.chat.completions.create(model="gpt-4o-mini", messages=secret_msg)  # type: ignore[arg-type]
        metrics = urllib.request.urlopen(s.proxy.url + "/metrics", timeout=10).read().decode()
        health = json.loads(urllib.request.urlopen(s.proxy.url + "/healthz", timeout=10).read())
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(s.proxy.url + "/nope", timeout=10)
        deadline = time.monotonic() + 10
        while not pub.values and time.monotonic() < deadline:
            time.sleep(0.02)
    (e,) = pub.events()
    assert e.prompt is not None and "jo@example.com" not in e.prompt and "[REDACTED_EMAIL]" in e.prompt
    assert "[REDACTED_KEY]" in e.prompt
    assert e.response is not None and e.response.startswith("lorem ipsum")
    assert "llmpulse_proxy_overhead_seconds_bucket" in metrics
    assert health["status"] == "ok" and health["upstreams"] == {"mock": "closed"}
    assert missing.value.code == 404 and "x-llmpulse-overhead-ms" in missing.value.headers
