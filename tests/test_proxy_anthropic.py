"""The Anthropic Messages API through the proxy, with the official `anthropic` client (only
its base_url changed) against the mock upstream's Anthropic endpoint: plain, streamed and
async calls, cache tokens priced at their own rates, Anthropic's error types, routing by
prefix and model pattern; the calls read back from ClickHouse, written by the real sink."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import pytest

from llmpulse.config import Settings
from llmpulse.producers.keyhash import KeyHasher, load_secret
from llmpulse.producers.mock_upstream import MockOptions, prompt_tokens_of
from llmpulse.producers.pricing import price_call
from llmpulse.producers.proxy.tokens import estimate_tokens, usage_from
from llmpulse.schemas.call import CallEvent
from tests.mock_servers import ListPublisher, Servers, upstream_settings
from tests.pipeline import Component, settings_from, wait_for, write_config

API_KEY = "sk-ant-api03-RAWKEY-0123456789abcdefXYZ"
SYSTEM = "You are kind and brief."
MESSAGES: list[Any] = [{"role": "user", "content": "Say something nice about Kafka and ClickHouse."}]
CACHE = {"x-mock-cache-read-tokens": "40", "x-mock-cache-write-tokens": "24", "x-mock-cache-write-1h-tokens": "8"}
SNAPSHOT = "claude-sonnet-4-6-served"  # the model the response names, as a dated snapshot would
COLUMNS = (
    "provider, operation, model, response_model, streamed, status_code, error_type, prompt_tokens, "
    "completion_tokens, total_tokens, cached_tokens, ttft_ms, latency_ms, toFloat64(cost_usd), api_key_hash, user"
)


def _sonnet_cost(uncached: int, read: int, write_5m: int, write_1h: int, output: int) -> float:
    """Claude Sonnet 4.6 list prices, USD per 1M tokens: input 3, cache read 0.30, 5-minute
    cache write 3.75, 1-hour cache write 6, output 15 (written out here, not read from the table)."""
    return (uncached * 3.0 + read * 0.30 + write_5m * 3.75 + write_1h * 6.0 + output * 15.0) / 1e6


@pytest.mark.e2e
def test_anthropic_sdk_calls_land_in_clickhouse_with_cache_tokens_ttft_cost_and_error_types(
    make_settings: Callable[..., Settings], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with Servers(lambda url: make_settings(**upstream_settings(url)), mock_options=MockOptions(chunk_delay_ms=2)) as s:
        config = write_config(tmp_path / "llmpulse.yaml", s.settings)
        sink = Component(config, "sink", log=tmp_path / "sink.log").start()
        try:
            client = anthropic.Anthropic(base_url=s.proxy.url, api_key=API_KEY, max_retries=0)
            app = {"X-LLMPulse-App": "claude-app"}
            plain = client.messages.create(
                model="claude-sonnet-4-6", max_tokens=256, system=SYSTEM, messages=MESSAGES,
                extra_headers={**app, **CACHE, "x-mock-served-model": SNAPSHOT, "X-LLMPulse-User": "plain"},
            )
            assert plain.model == SNAPSHOT and plain.usage.cache_read_input_tokens == 40
            # the upstream got the client's key and Anthropic headers unchanged, none of llmpulse's
            seen = {k.lower(): v for k, v in s.mock.stats.last_headers.items()}
            # (this SDK sends the key as a bearer token; older ones and curl use x-api-key, below)
            assert seen["authorization"] == f"Bearer {API_KEY}" and seen["anthropic-version"]
            assert not [k for k in seen if k.lower().startswith("x-llmpulse")]
            assert "stream_options" not in s.mock.stats.last_body  # nothing injected into Anthropic bodies

            with client.messages.stream(
                model="claude-sonnet-4-6", max_tokens=256, system=SYSTEM, messages=MESSAGES,
                extra_headers={**app, **CACHE, "x-mock-served-model": SNAPSHOT, "X-LLMPulse-User": "stream"},
            ) as stream:
                text = "".join(stream.text_stream)
                final = stream.get_final_message()
            assert text == plain.content[0].text  # type: ignore[union-attr]
            assert final.usage.output_tokens == 16 and final.usage.input_tokens == plain.usage.input_tokens

            async def async_stream() -> list[Any]:
                aclient = anthropic.AsyncAnthropic(base_url=s.proxy.url, api_key=API_KEY, max_retries=0)
                events = await aclient.messages.create(
                    model="claude-haiku-4-5", max_tokens=64, messages=MESSAGES, stream=True,
                    extra_headers={**app, "X-LLMPulse-User": "async"},
                )
                got = [e async for e in events]
                await aclient.close()
                return got

            async_events = asyncio.run(async_stream())
            assert async_events[0].type == "message_start"
            assert async_events[-1].type == "message_stop"

            failures = {"429": "rate-limit", "529": "overloaded", "400": "bad-request"}
            for status, user in failures.items():
                with pytest.raises(anthropic.APIStatusError) as err:
                    client.messages.create(
                        model="claude-sonnet-4-6", max_tokens=64, messages=MESSAGES,
                        extra_headers={**app, "x-mock-status": status, "X-LLMPulse-User": user},
                    )
                assert err.value.status_code == int(status)
            broken = client.messages.stream(  # an `error` event halfway through
                model="claude-sonnet-4-6", max_tokens=64, messages=MESSAGES,
                extra_headers={**app, "x-mock-stream-error": "overloaded_error", "X-LLMPulse-User": "mid-stream"},
            )
            with pytest.raises(anthropic.APIStatusError) as mid, broken as events:
                for _ in events.text_stream:
                    pass
            assert "overloaded_error" in str(mid.value)

            settings = settings_from(config)
            rows = wait_for(
                settings,
                f"SELECT {COLUMNS} FROM llmpulse.llm_calls FINAL WHERE app = 'claude-app' ORDER BY ts",
                lambda r: len(r) >= 7,
            )
            dump = wait_for(settings, "SELECT * FROM llmpulse.llm_calls FINAL", lambda r: len(r) >= 7)
        finally:
            sink.stop()
        key_hash = KeyHasher(load_secret(s.settings.data_dir)).hash(API_KEY)

    assert len(rows) == 7, rows
    names = COLUMNS.replace("toFloat64(cost_usd)", "cost_usd").split(", ")
    calls = {r[-1]: dict(zip(names, r, strict=True)) for r in rows}
    for c in calls.values():
        assert (c["provider"], c["operation"]) == ("anthropic", "chat")
        assert c["api_key_hash"] == key_hash and c["latency_ms"] > 0

    uncached = prompt_tokens_of({"system": SYSTEM, "messages": MESSAGES})
    assert plain.usage.input_tokens == uncached
    for user, streamed in (("plain", False), ("stream", True)):
        c = calls[user]
        assert c["streamed"] is streamed and (c["status_code"], c["error_type"]) == (200, "")
        assert (c["model"], c["response_model"]) == ("claude-sonnet-4-6", SNAPSHOT)
        # prompt tokens: every input token, cache reads and writes included; cached = cache reads
        assert (c["prompt_tokens"], c["completion_tokens"]) == (uncached + 40 + 24, 16)
        assert (c["cached_tokens"], c["total_tokens"]) == (40, uncached + 40 + 24 + 16)
        want = _sonnet_cost(uncached, read=40, write_5m=16, write_1h=8, output=16)
        assert c["cost_usd"] == pytest.approx(want, abs=1e-9)
        assert want == pytest.approx(price_call(
            "claude-sonnet-4-6", uncached + 64, 16, cached_tokens=40, cache_write_tokens=24, cache_write_1h_tokens=8
        ))
        if streamed:  # the first content_block_delta, after the mock's chunk delays began
            assert c["ttft_ms"] is not None and 0 < c["ttft_ms"] < c["latency_ms"]
            assert c["latency_ms"] >= 16 * 2
        else:
            assert c["ttft_ms"] is None

    a = calls["async"]
    assert a["streamed"] is True and (a["model"], a["response_model"]) == ("claude-haiku-4-5", "claude-haiku-4-5")
    assert (a["prompt_tokens"], a["completion_tokens"], a["cached_tokens"]) == (prompt_tokens_of({"messages": MESSAGES}), 16, 0)
    assert a["cost_usd"] == pytest.approx((a["prompt_tokens"] * 1.0 + 16 * 5.0) / 1e6, abs=1e-9)
    assert a["ttft_ms"] is not None and a["ttft_ms"] > 0

    errors = {u: (calls[u]["status_code"], calls[u]["error_type"], calls[u]["cost_usd"]) for u in failures.values()}
    assert errors == {
        "rate-limit": (429, "rate_limit_error", None),
        "overloaded": (529, "overloaded_error", None),
        "bad-request": (400, "invalid_request_error", None),
    }
    m = calls["mid-stream"]  # usage of message_start kept: the input was processed and is billed
    assert (m["streamed"], m["status_code"], m["error_type"]) == (True, 529, "overloaded_error")
    assert m["prompt_tokens"] == prompt_tokens_of({"messages": MESSAGES}) and m["ttft_ms"] is not None

    # the raw key is nowhere: not in a stored row, not in the proxy's or the sink's logs
    assert len(dump) == 7 and API_KEY not in "\n".join("\t".join(map(str, r)) for r in dump)
    assert API_KEY not in caplog.text and API_KEY not in (tmp_path / "sink.log").read_text()


def _by_user(pub: ListPublisher, n: int, timeout: float = 15) -> dict[str | None, CallEvent]:
    deadline = time.monotonic() + timeout
    while len(pub.events()) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    events = {e.user: e for e in pub.events()}
    assert len(events) == n, events
    return events


def test_routing_by_prefix_and_model_pattern_provider_and_proxy_errors_in_anthropic_shape(
    make_settings: Callable[..., Settings],
) -> None:
    pub = ListPublisher()

    def settings_for(url: str) -> Settings:
        return make_settings(**{"proxy.upstreams": [
            {"name": "openai", "base_url": url, "models": ["gpt-*"]},
            {"name": "claude", "base_url": url, "models": ["claude-*"]},  # provider left unset
            {"name": "bedrock", "base_url": url, "provider": "aws-bedrock", "path_prefix": "/bedrock"},
        ]})

    with Servers(settings_for, publisher=pub) as s:
        client = anthropic.Anthropic(base_url=s.proxy.url, api_key=API_KEY, max_retries=0)
        client.messages.create(
            model="claude-3-5-haiku-latest", max_tokens=32, messages=MESSAGES, extra_headers={"X-LLMPulse-User": "haiku"}
        )
        prefixed = anthropic.Anthropic(base_url=s.proxy.url + "/bedrock", api_key=API_KEY, max_retries=0)
        prefixed.messages.create(
            model="claude-opus-4-1", max_tokens=32, messages=MESSAGES, extra_headers={"X-LLMPulse-User": "opus"}
        )
        assert s.mock.stats.by_path["/v1/messages"] == 2  # the prefix removed before forwarding
        # no upstream for this model (no default: every upstream has patterns or a prefix)
        with pytest.raises(anthropic.NotFoundError) as missing:
            client.messages.create(
                model="mystery-model", max_tokens=32, messages=MESSAGES, extra_headers={"X-LLMPulse-User": "unrouted"}
            )
        body = missing.value.body
        assert isinstance(body, dict) and body["type"] == "error"
        assert body["error"]["type"] == "not_found_error" and "mystery-model" in body["error"]["message"]
        with pytest.raises(anthropic.AuthenticationError):  # the upstream's own 401, passed on
            client.messages.create(
                model="claude-3-5-haiku-latest", max_tokens=32, messages=MESSAGES,
                extra_headers={"x-mock-status": "401", "X-LLMPulse-User": "unauth"},
            )
        with pytest.raises(anthropic.APIStatusError) as overloaded:  # asked to stream, refused before it began
            client.messages.create(
                model="claude-3-5-haiku-latest", max_tokens=32, messages=MESSAGES, stream=True,
                extra_headers={"x-mock-status": "529", "X-LLMPulse-User": "stream-529"},
            )
        assert overloaded.value.status_code == 529
        curl = urllib.request.Request(  # as the curl snippet of docs/anthropic.md
            s.proxy.url + "/v1/messages", method="POST",
            data=json.dumps({"model": "claude-haiku-4-5", "max_tokens": 32, "messages": MESSAGES}).encode(),
            headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01", "content-type": "application/json",
                     "X-LLMPulse-User": "raw"},
        )
        reply = json.loads(urllib.request.urlopen(curl, timeout=10).read())
        assert reply["type"] == "message" and reply["usage"]["output_tokens"] == 16
        assert {k.lower(): v for k, v in s.mock.stats.last_headers.items()}["x-api-key"] == API_KEY
        events = _by_user(pub, 6)
    haiku, opus, unrouted, unauth, raw = (events[u] for u in ("haiku", "opus", "unrouted", "unauth", "raw"))
    refused = events["stream-529"]
    assert (refused.status_code, refused.error_type, refused.streamed, refused.ttft_ms) == (529, "overloaded_error", False, None)

    assert (haiku.provider, haiku.operation, haiku.cost_usd is not None) == ("anthropic", "chat", True)
    assert haiku.cost_usd == pytest.approx(price_call("claude-3-5-haiku-latest", haiku.prompt_tokens, 16))
    assert (opus.provider, opus.model, opus.operation) == ("aws-bedrock", "claude-opus-4-1", "chat")
    assert (unrouted.status_code, unrouted.error_type, unrouted.provider) == (404, "invalid_request", "anthropic")
    assert (unauth.status_code, unauth.error_type) == (401, "authentication_error")
    assert (raw.provider, raw.operation, raw.prompt_tokens, raw.completion_tokens) == (
        "anthropic", "chat", reply["usage"]["input_tokens"], 16
    )
    # one key, one hash, whichever header carried it (Authorization: Bearer, x-api-key)
    key_hash = KeyHasher(load_secret(s.settings.data_dir)).hash(API_KEY)
    assert {e.api_key_hash for e in (haiku, opus, unrouted, unauth, raw)} == {key_hash}


def test_usage_shapes_and_calls_without_usage_are_estimated_alike_streamed_or_not(
    make_settings: Callable[..., Settings],
) -> None:
    # Anthropic's usage: input_tokens leaves the cache out; OpenAI's shape wins when both are there
    u = usage_from({"input_tokens": 5, "cache_read_input_tokens": 7, "cache_creation_input_tokens": 3,
                    "cache_creation": {"ephemeral_1h_input_tokens": 2}, "output_tokens": 9,
                    "output_tokens_details": {"thinking_tokens": 4}})
    assert u is not None
    assert (u.prompt_tokens, u.cached_tokens, u.cache_write_tokens, u.cache_write_1h_tokens) == (15, 7, 3, 2)
    assert (u.completion_tokens, u.reasoning_tokens, u.total_tokens) == (9, 4, 24)
    gateway = usage_from({"prompt_tokens": 20, "completion_tokens": 5, "cache_read_input_tokens": 7,
                          "prompt_tokens_details": {"cached_tokens": 7}})
    assert gateway is not None and (gateway.prompt_tokens, gateway.cached_tokens) == (20, 7)

    pub = ListPublisher()
    with Servers(lambda url: make_settings(**upstream_settings(url)), publisher=pub) as s:
        for user, stream in (("plain", False), ("stream", True)):
            req = urllib.request.Request(
                s.proxy.url + "/v1/messages", method="POST",
                data=json.dumps({"model": "claude-haiku-4-5", "max_tokens": 32, "system": SYSTEM,
                                 "messages": MESSAGES, "stream": stream}).encode(),
                headers={"x-api-key": API_KEY, "content-type": "application/json", "x-mock-no-usage": "1",
                         "X-LLMPulse-User": user},
            )
            reply = urllib.request.urlopen(req, timeout=10).read()
            assert b"usage" not in reply
        events = _by_user(pub, 2)
    plain, streamed = events["plain"], events["stream"]
    for e in (plain, streamed):
        assert e.tokens_estimated and e.provider == "anthropic"
        assert e.prompt_tokens > estimate_tokens(SYSTEM)  # system prompt and messages both counted
        assert e.cost_usd == pytest.approx((e.prompt_tokens * 1.0 + e.completion_tokens * 5.0) / 1e6)
    # the same text estimated the same way, from content blocks or from content_block_deltas
    assert (plain.prompt_tokens, plain.completion_tokens) == (streamed.prompt_tokens, streamed.completion_tokens)
    assert plain.completion_tokens == estimate_tokens(" ".join(["lorem", "ipsum", "dolor", "sit", "amet",
                                                               "consectetur", "adipiscing", "elit"] * 2))
