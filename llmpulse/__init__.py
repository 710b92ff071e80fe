"""llmpulse: real-time monitoring of LLM API calls and GPUs.

In an app (the light install)::

    import llmpulse
    client = llmpulse.instrument(openai.OpenAI())     # every call becomes a CallEvent
    llmpulse.record(model="claude-3-5-sonnet", provider="anthropic", prompt_tokens=..., ...)

Importing this package is cheap: the SDK loads on first use of an attribute below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "instrument": "llmpulse.sdk.instrument",
    "uninstrument": "llmpulse.sdk.instrument",
    "record": "llmpulse.sdk.recorder",
    "recorder": "llmpulse.sdk.recorder",
    "Recorder": "llmpulse.sdk.recorder",
    "flush": "llmpulse.sdk.background",
    "configure": "llmpulse.sdk.background",
}

__all__ = ["Recorder", "__version__", "configure", "flush", "instrument", "record", "recorder", "uninstrument"]

if TYPE_CHECKING:
    from llmpulse.sdk.background import configure, flush
    from llmpulse.sdk.instrument import instrument, uninstrument
    from llmpulse.sdk.recorder import Recorder, record, recorder


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'llmpulse' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
