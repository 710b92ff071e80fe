"""From an app to ClickHouse: the SDK instrumenting a real openai client, and the proxy, with the
real sink writing llm_calls; tokens and cost checked in the table."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

import llmpulse
from llmpulse.config import Settings
from llmpulse.producers.mock_upstream import MockUpstream, start_mock_upstream
from llmpulse.producers.pricing import price_call
from llmpulse.sdk import background
from tests.pipeline import Component, settings_from, wait_for, write_config


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


@pytest.mark.e2e
def test_sdk_calls_land_in_clickhouse_with_tokens_and_cost(
    upstream: MockUpstream, make_settings: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMPULSE_SECRET_KEY_HASH", "ch-test-secret")
    base = make_settings(**{"sdk.app": "ch-app", "sdk.flush_interval_s": 0.05})
    config = write_config(tmp_path / "llmpulse.yaml", base)
    settings = settings_from(config)
    sink = Component(config, "sink", log=tmp_path / "sink.log").start()
    try:
        llmpulse.configure(base)
        client = llmpulse.instrument(openai.OpenAI(base_url=upstream.base_url, api_key="sk-test-abcdefghijklmnop0123"))
        plain = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}])
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}], stream=True
        )
        chunks = list(stream)
        assert chunks and all(c.choices for c in chunks)  # the usage chunk the SDK asked for stays hidden
        llmpulse.flush()
        rows = wait_for(
            settings,
            "SELECT streamed, prompt_tokens, completion_tokens, total_tokens, toFloat64(cost_usd), app, api_key_hash "
            "FROM llmpulse.llm_calls FINAL WHERE app = 'ch-app' ORDER BY streamed",
            lambda r: len(r) >= 2,
        )
        assert [r[0] for r in rows] == [False, True]
        usage = plain.usage
        assert usage is not None
        for r in rows:
            assert (r[1], r[2], r[3]) == (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
            want = price_call("gpt-4o-mini", usage.prompt_tokens, usage.completion_tokens)
            assert want is not None and r[4] == pytest.approx(want, abs=1e-9)
            assert r[6].startswith("hk_") and "sk-test" not in r[6]
    finally:
        background.runtime().publisher.close(5)  # type: ignore[union-attr]
        sink.stop()
