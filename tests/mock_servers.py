"""A mock upstream and the proxy running in a background event loop, for synchronous tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from llmpulse.config import Settings
from llmpulse.producers.mock_upstream import MockOptions, MockUpstream, start_mock_upstream
from llmpulse.producers.proxy import ProxyServer, start_proxy
from llmpulse.producers.proxy.events import RawPublisher
from llmpulse.schemas.call import CallEvent
from llmpulse.schemas.codec import decode

T = TypeVar("T")


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Servers:
    """Mock upstream + proxy. `settings_for(mock_base_url)` gives the proxy's settings."""

    def __init__(
        self,
        settings_for: Callable[[str], Settings],
        publisher: RawPublisher | None = None,
        mock_options: MockOptions | None = None,
    ) -> None:
        self.lt = LoopThread()
        self.mock: MockUpstream = self.lt.run(start_mock_upstream(options=mock_options or MockOptions()))
        self.settings = settings_for(self.mock.base_url)
        self.proxy: ProxyServer = self.lt.run(start_proxy(self.settings, publisher, port=0))

    @property
    def base_url(self) -> str:
        return self.proxy.base_url

    def close(self) -> None:
        try:
            self.lt.run(self.proxy.stop())
            self.lt.run(self.mock.stop())
        finally:
            self.lt.close()

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def upstream_settings(base_url: str, **upstream: Any) -> dict[str, Any]:
    return {"proxy.upstreams": [{"name": "mock", "base_url": base_url, **upstream}]}


def call_events(messages: list[Any]) -> list[CallEvent]:
    out: list[CallEvent] = []
    for m in messages:
        d = decode(m.value(), CallEvent)
        assert not d.rejected, d.rejected
        out.extend(d.valid)
    return out


class ListPublisher:
    """Collects published values in memory (for tests that do not need Kafka)."""

    def __init__(self) -> None:
        self.values: list[tuple[str, bytes, bytes | str | None]] = []

    def publish_raw(self, topic: str, value: bytes, key: bytes | str | None = None) -> bool:
        self.values.append((topic, value, key))
        return True

    def events(self) -> list[CallEvent]:
        """The events of every message (a value is one event or a batch envelope)."""
        out: list[CallEvent] = []
        for _, v, _ in self.values:
            d = decode(v, CallEvent)
            assert not d.rejected, d.rejected
            out.extend(d.valid)
        return out
