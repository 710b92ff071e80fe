"""Run a server's main coroutine on the fastest event loop at hand.

uvloop (the `all` extra) when installed: it halves the per-request CPU of the aiohttp
server and client compared with the stdlib loop, which keeps the proxy's latency tail
short on one core. ``loop="asyncio"`` forces the stdlib loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")
LoopName = Literal["auto", "uvloop", "asyncio"]


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def run(main: Coroutine[Any, Any, T], loop: LoopName = "auto") -> T:
    """asyncio.run(main) on uvloop when available (or asked for), else the stdlib loop."""
    if loop == "asyncio" or (loop == "auto" and not uvloop_available()):
        return asyncio.run(main)
    try:
        import uvloop
    except ImportError:
        main.close()
        from llmpulse.errors import LLMPulseError

        raise LLMPulseError("uvloop is not installed (pip install 'llmpulse[all]')") from None
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
