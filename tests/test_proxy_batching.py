"""The proxy micro-batches call events per model: fewer messages, every event once, flushed on linger and stop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import openai
import pytest

from llmpulse.config import Settings
from llmpulse.config.loader import ConfigError
from llmpulse.embedded.broker import EmbeddedBroker
from llmpulse.producers.proxy.batching import KeyedBatcher, envelope, events_in
from llmpulse.schemas.call import CallEvent
from llmpulse.schemas.codec import decode
from tests.kafkatools import read_messages
from tests.mock_servers import Servers, call_events, upstream_settings

MESSAGES = [{"role": "user", "content": "hello"}]


def _settings(make_settings: Callable[..., Settings], **proxy: Any) -> Callable[[str], Settings]:
    return lambda url: make_settings(**upstream_settings(url), **{f"proxy.{k}": v for k, v in proxy.items()})


def _read_events(bootstrap: str, settings: Settings, n: int, timeout: float = 60) -> list[Any]:
    """Messages of the calls topic until they hold `n` events (and a quiet second for extras)."""
    return read_messages(
        bootstrap, settings.kafka.topic("calls"), until=lambda ms: len(call_events(ms)) >= n, timeout=timeout, quiet_s=1.0
    )


def _calls(base_url: str, models: list[str]) -> None:
    async def go() -> None:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-x", max_retries=0)
        await asyncio.gather(
            *(client.chat.completions.create(model=m, messages=MESSAGES, user=f"u{i}") for i, m in enumerate(models))  # type: ignore[arg-type]
        )
        await client.close()

    asyncio.run(go())


def test_calls_arrive_batched_per_model_each_event_once(
    broker: EmbeddedBroker, make_settings: Callable[..., Settings]
) -> None:
    models = ["gpt-4o"] * 24 + ["gpt-4o-mini"] * 16
    with Servers(_settings(make_settings, batch_max_events=16, batch_linger_ms=2000)) as s:
        _calls(s.base_url, models)
        msgs = _read_events(broker.bootstrap, s.settings, len(models))
        assert s.proxy.recorder is not None and s.proxy.recorder.recorded == len(models)
    assert len(msgs) < len(models)
    sizes = []
    for m in msgs:
        d = decode(m.value(), CallEvent)
        assert not d.rejected
        assert {e.model for e in d.valid} == {m.key().decode()}  # one model per message, keyed by it
        sizes.append(len(d.valid))
    assert max(sizes) == 16 and all(n <= 16 for n in sizes)  # a full buffer went out at once
    events = call_events(msgs)
    assert sorted(e.user or "" for e in events) == sorted(f"u{i}" for i in range(len(models)))
    assert len({e.event_id for e in events}) == len(events)


def test_a_lone_call_is_published_after_the_linger(broker: EmbeddedBroker, make_settings: Callable[..., Settings]) -> None:
    linger_ms = 400
    with Servers(_settings(make_settings, batch_linger_ms=linger_ms)) as s:
        client = openai.OpenAI(base_url=s.base_url, api_key="sk-x", max_retries=0)
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, user="lone")  # type: ignore[arg-type]
        answered = time.monotonic()
        recorder = s.proxy.recorder
        assert recorder is not None
        # no further traffic: the loop timer publishes the buffer
        while recorder.batcher.messages == 0 and time.monotonic() - answered < 30:
            time.sleep(0.005)
        published_after_s = time.monotonic() - answered
        msgs = _read_events(broker.bootstrap, s.settings, 1, timeout=30)  # still running: not the stop flush
    assert recorder.batcher.messages == 1
    assert linger_ms / 1000 - 0.05 <= published_after_s <= linger_ms / 1000 + 2.0, published_after_s
    (m,) = msgs
    assert m.key() == b"gpt-4o"
    (e,) = call_events(msgs)
    assert e.user == "lone"


def test_a_clean_stop_publishes_partly_filled_batches(
    broker: EmbeddedBroker, make_settings: Callable[..., Settings]
) -> None:
    with Servers(_settings(make_settings, batch_linger_ms=60_000)) as s:
        client = openai.OpenAI(base_url=s.base_url, api_key="sk-x", max_retries=0)
        for i, model in enumerate(["gpt-4o", "gpt-4o", "gpt-4o-mini"]):
            client.chat.completions.create(model=model, messages=MESSAGES, user=f"s{i}")  # type: ignore[arg-type]
        recorder = s.proxy.recorder
        assert recorder is not None
        deadline = time.monotonic() + 10
        while recorder.batcher.buffered < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert recorder.batcher.buffered == 3 and recorder.batcher.messages == 0
    # Servers.close() stopped the proxy: buffers flushed, then the publisher closed
    msgs = _read_events(broker.bootstrap, s.settings, 3)
    assert sorted((m.key(), events_in(m.value())) for m in msgs) == [(b"gpt-4o", 2), (b"gpt-4o-mini", 1)]
    assert sorted(e.user or "" for e in call_events(msgs)) == ["s0", "s1", "s2"]


def test_batch_max_events_1_gives_one_message_per_call(
    broker: EmbeddedBroker, make_settings: Callable[..., Settings]
) -> None:
    models = ["gpt-4o"] * 5
    with Servers(_settings(make_settings, batch_max_events=1)) as s:
        _calls(s.base_url, models)
        msgs = _read_events(broker.bootstrap, s.settings, len(models))
    assert len(msgs) == len(models)
    for m in msgs:  # each the plain event, as before batching
        assert b'"events"' not in m.value()
        CallEvent.model_validate_json(m.value())
    assert sorted(e.user or "" for e in call_events(msgs)) == sorted(f"u{i}" for i in range(5))


class _Refusing:
    """A publisher whose queue and spool are full: every message is refused."""

    def __init__(self) -> None:
        self.values: list[bytes] = []

    def publish_raw(self, topic: str, value: bytes, key: bytes | str | None = None) -> bool:
        self.values.append(value)
        return False


def test_linger_0_is_unbatched_and_drops_count_events() -> None:
    pub = _Refusing()
    b = KeyedBatcher(pub, "calls", max_events=200, linger_s=0)
    b.add("m", b'{"a":1}')
    b.add("m", b'{"a":2}')
    assert pub.values == [b'{"a":1}', b'{"a":2}'] and b.dropped_events == 2

    async def batched() -> KeyedBatcher:
        kb = KeyedBatcher(pub, "calls", max_events=3, linger_s=60)
        for i in range(7):
            kb.add("m", b'{"a":%d}' % i)
        kb.close()
        return kb

    pub.values.clear()
    kb = asyncio.run(batched())
    assert [events_in(v) for v in pub.values] == [3, 3, 1]
    assert kb.dropped_events == 7 and kb.messages == 3 and kb.buffered == 0
    assert events_in(envelope([b"{}", b"{}"])) == 2 and events_in(b'{"events":') == 1


def test_batch_settings_are_validated(make_settings: Callable[..., Settings]) -> None:
    st = make_settings()
    assert (st.proxy.batch_max_events, st.proxy.batch_linger_ms) == (200, 50.0)
    with pytest.raises(ConfigError, match=r"proxy\.batch_max_events"):
        make_settings(**{"proxy.batch_max_events": 0})
    with pytest.raises(ConfigError, match=r"proxy\.batch_linger_ms"):
        make_settings(**{"proxy.batch_linger_ms": -1})
