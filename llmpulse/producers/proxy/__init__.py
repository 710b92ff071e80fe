"""The OpenAI-compatible monitoring proxy: one changed base URL, every call on Kafka.

Start it from code with ``server = await start_proxy(settings)`` (see `app.py`), or
run ``llmpulse proxy``. `tokens` (token estimation and usage parsing) is stdlib-only
so that the in-app SDK can import it without the proxy's dependencies; this package
imports nothing heavy until `ProxyServer` / `start_proxy` are used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmpulse.producers.proxy.app import ProxyServer, start_proxy

__all__ = ["ProxyServer", "start_proxy"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from llmpulse.producers.proxy import app

        return getattr(app, name)
    raise AttributeError(name)
