"""In-app SDK: a real openai client instrumented against the mock upstream, events on the real broker."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

import llmpulse
from llmpulse.config import Settings
from llmpulse.producers.keyhash import KeyHasher
from llmpulse.producers.mock_upstream import MockUpstream, prompt_tokens_of, start_mock_upstream
from llmpulse.producers.pricing import price_call
from llmpulse.schemas import CallEvent, decode
from llmpulse.sdk import background
from tests.kafkatools import read_messages

API_KEY = "sk-test-0123456789abcdefghijklmnop"
SECRET = "sdk-test-secret"


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockUpstream]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    mock = asyncio.run_coroutine_threadsafe(start_mock_upstream(), loop).result(30)
    yield mock
    asyncio.run_coroutine_threadsafe(mock.stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


@pytest.fixture
def sdk(make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    monkeypatch.setenv("LLMPULSE_SECRET_KEY_HASH", SECRET)
    settings = make_settings(**{"sdk.app": "sdk-test", "sdk.flush_interval_s": 0.05})
    llmpulse.configure(settings)
    yield settings
    background.runtime().publisher.close(5)  # type: ignore[union-attr]


def events_of(settings: Settings, n: int) -> list[CallEvent]:
    def count(ms: list[Any]) -> int:
        return sum(len(decode(m.value(), CallEvent).valid) for m in ms)

    msgs = read_messages(
        settings.kafka.bootstrap_servers(), settings.kafka.topic("calls"),
        until=lambda ms: count(ms) >= n, quiet_s=1.0, timeout=60,
    )
    out: list[CallEvent] = []
    for m in msgs:
        d = decode(m.value(), CallEvent)
        assert not d.rejected
        assert {e.model for e in d.valid} == {m.key().decode()}
        out.extend(d.valid)
    return out


def by_user(events: list[CallEvent]) -> dict[str, CallEvent]:
    out = {e.user: e for e in events if e.user}
    assert len(out) == len(events), "each call in these tests has its own user"
    return out


def check_tokens(e: CallEvent, model: str, prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> None:
    assert (e.prompt_tokens, e.completion_tokens, e.total_tokens) == (prompt, completion, prompt + completion)
    assert (e.cached_tokens, e.reasoning_tokens) == (cached, reasoning)
    assert not e.tokens_estimated
    expected = price_call(model, prompt, completion, cached, reasoning)
    assert expected is not None and expected > 0
    assert e.cost_usd == pytest.approx(expected)


def test_sync_client_streamed_and_not(upstream: MockUpstream, sdk: Settings) -> None:
    client = llmpulse.instrument(openai.OpenAI(api_key=API_KEY, base_url=upstream.base_url, max_retries=0))
    msgs = [{"role": "user", "content": "How many tokens is this prompt, roughly speaking?"}]
    body = {"messages": msgs}

    r = client.chat.completions.create(model="gpt-4o-mini", messages=msgs, user="u-chat",  # type: ignore[arg-type]
                                       extra_headers={"x-mock-tokens": "12", "x-mock-cached-tokens": "4"})
    assert r.usage is not None and r.usage.completion_tokens == 12

    chunks = list(client.chat.completions.create(model="gpt-4o", messages=msgs, stream=True, user="u-stream",  # type: ignore[arg-type]
                                                 extra_headers={"x-mock-tokens": "20", "x-mock-chunk-delay-ms": "5"}))
    assert chunks and all(c.choices for c in chunks), "the usage chunk the SDK asked for stays hidden"
    assert "".join(c.choices[0].delta.content or "" for c in chunks).count(" ") == 19
    assert upstream.stats.last_body.get("stream_options") == {"include_usage": True}

    # the app asked for usage itself: it sees the usage chunk
    own = list(client.chat.completions.create(model="gpt-4o", messages=msgs, stream=True, user="u-own",  # type: ignore[arg-type]
                                              stream_options={"include_usage": True}))
    assert own[-1].choices == [] and own[-1].usage is not None

    with client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi", stream=True, user="u-cmpl",
                                   extra_headers={"x-mock-tokens": "7"}) as stream:
        texts = [c.choices[0].text for c in stream]
    assert len(texts) == 7

    emb = client.embeddings.create(model="text-embedding-3-small", input=["a b c d", "e f g h"], user="u-emb")
    assert len(emb.data) == 2

    resp = client.responses.create(model="o4-mini", input="Think about it", user="u-resp",
                                   extra_headers={"x-mock-tokens": "30", "x-mock-reasoning-tokens": "10"})
    assert resp.output_text
    rstream = [ev.type for ev in client.responses.create(model="gpt-4.1", input="stream it", stream=True, user="u-rstream")]
    assert rstream[-1] == "response.completed"

    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4o-mini", messages=msgs, user="u-err",  # type: ignore[arg-type]
                                       extra_headers={"x-mock-status": "500"})

    client.close()
    events = by_user(events_of(sdk, 8))
    assert set(events) == {"u-chat", "u-stream", "u-own", "u-cmpl", "u-emb", "u-resp", "u-rstream", "u-err"}
    key_hash = KeyHasher(SECRET.encode()).hash(API_KEY)
    for e in events.values():
        assert e.source == "sdk" and e.app == "sdk-test" and e.provider == "self-hosted"
        assert e.api_key_hash == key_hash and API_KEY not in e.model_dump_json()
        assert e.latency_ms > 0
    p = prompt_tokens_of(body)
    check_tokens(events["u-chat"], "gpt-4o-mini", p, 12, cached=4)
    assert events["u-chat"].operation == "chat" and not events["u-chat"].streamed and events["u-chat"].ttft_ms is None
    check_tokens(events["u-stream"], "gpt-4o", p, 20)
    s = events["u-stream"]
    assert s.streamed and s.ttft_ms is not None and 0 < s.ttft_ms < s.latency_ms
    assert s.latency_ms - s.ttft_ms >= 19 * 5 * 0.8, "latency runs to the end of the stream"
    check_tokens(events["u-own"], "gpt-4o", p, 16)
    c = events["u-cmpl"]
    check_tokens(c, "gpt-3.5-turbo-instruct", prompt_tokens_of({"prompt": "Say hi"}), 7)
    assert c.operation == "completion" and c.streamed
    emb_e = events["u-emb"]
    assert emb_e.operation == "embedding" and emb_e.prompt_tokens == prompt_tokens_of({"input": ["a b c d", "e f g h"]})
    assert emb_e.cost_usd == pytest.approx(price_call("text-embedding-3-small", emb_e.prompt_tokens, 0))
    check_tokens(events["u-resp"], "o4-mini", prompt_tokens_of({"input": "Think about it"}), 30, reasoning=10)
    rs = events["u-rstream"]
    check_tokens(rs, "gpt-4.1", prompt_tokens_of({"input": "stream it"}), 16)
    assert rs.operation == "responses" and rs.streamed and rs.ttft_ms is not None
    err = events["u-err"]
    assert err.status_code == 500 and err.error_type and err.is_error


def test_async_client_streamed_and_not(upstream: MockUpstream, sdk: Settings) -> None:
    msgs = [{"role": "user", "content": "async hello there"}]

    async def main() -> list[str]:
        client = llmpulse.instrument(openai.AsyncOpenAI(api_key=API_KEY, base_url=upstream.base_url, max_retries=0),
                                     app="async-app")
        r = await client.chat.completions.create(model="gpt-4o-mini", messages=msgs, user="a-chat")  # type: ignore[arg-type]
        assert r.choices[0].message.content
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=msgs, stream=True,  # type: ignore[arg-type]
                                                      user="a-stream", extra_headers={"x-mock-tokens": "9"})
        pieces = [c.choices[0].delta.content or "" async for c in stream]
        emb = await client.embeddings.create(model="text-embedding-3-large", input="x y", user="a-emb")
        assert emb.data
        await client.close()
        return pieces

    pieces = asyncio.run(main())
    assert "".join(pieces).split() == ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "lorem"]
    events = by_user(events_of(sdk, 3))
    p = prompt_tokens_of({"messages": msgs})
    check_tokens(events["a-chat"], "gpt-4o-mini", p, 16)
    check_tokens(events["a-stream"], "gpt-4o-mini", p, 9)
    assert events["a-stream"].streamed and events["a-stream"].ttft_ms is not None
    assert events["a-emb"].operation == "embedding"
    assert {e.app for e in events.values()} == {"async-app"}


def test_stream_without_usage_is_estimated_and_record_api(upstream: MockUpstream, sdk: Settings) -> None:
    client = llmpulse.instrument(openai.OpenAI(api_key=API_KEY, base_url=upstream.base_url, max_retries=0))
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 40}],  # type: ignore[arg-type]
                                                 stream=True, user="e-nousage", extra_headers={"x-mock-no-usage": "1"}))
    assert chunks
    client.close()
    llmpulse.record(model="claude-3-5-haiku", provider="anthropic", prompt_tokens=800, completion_tokens=100,
                    latency_ms=640, user="r-record", api_key="sk-ant-other-key-123456789")
    with pytest.raises(TimeoutError), llmpulse.recorder(model="claude-3-5-haiku", provider="anthropic", user="r-fail"):
        raise TimeoutError("upstream timed out")
    with llmpulse.recorder(model="mistral-small", provider="mistral", user="r-ok") as call:
        call.first_token()
        call.usage(prompt_tokens=50, completion_tokens=5)
    assert llmpulse.record(model="", prompt_tokens=-1) is None  # invalid: logged, not raised

    events = by_user(events_of(sdk, 4))
    est = events["e-nousage"]
    assert est.tokens_estimated and est.completion_tokens > 0 and est.prompt_tokens > 0
    rec = events["r-record"]
    assert rec.cost_usd == pytest.approx(price_call("claude-3-5-haiku", 800, 100))
    assert rec.api_key_hash == KeyHasher(SECRET.encode()).hash("sk-ant-other-key-123456789")
    assert events["r-fail"].error_type == "TimeoutError" and events["r-fail"].status_code == 0
    ok = events["r-ok"]
    assert ok.streamed and ok.ttft_ms is not None and ok.cost_usd == pytest.approx(price_call("mistral-small", 50, 5))
