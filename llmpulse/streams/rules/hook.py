"""The worker's entry point to the rules: load from settings, hot reload, judge, sweep.

``RulesRuntime`` is callable with the worker's hook signature ``RulesHook``:
``(aggregate, stored_state_or_None) -> (alerts, state_to_store_or_None)``. The type lives
here, on the rules side, so the rules never import the worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from llmpulse.config import Settings
from llmpulse.schemas import Alert, WindowAggregate
from llmpulse.streams.rules.engine import RulesEngine, new_state
from llmpulse.streams.rules.loader import DEFAULT_WINDOWS_S, RulesReloader

log = logging.getLogger(__name__)

RulesHook = Callable[[WindowAggregate, dict[str, Any] | None], tuple[list[Alert], dict[str, Any] | None]]
"""What the worker's finalizer calls per final aggregate: (aggregate, stored state or None)
-> (alerts to publish, state to store or None)."""


class RulesRuntime:
    """Rules engine plus hot reload of the rules file (checked at most every ``reload_every_s``)."""

    def __init__(
        self,
        path: str | Path | None,
        windows_s: Iterable[int] = DEFAULT_WINDOWS_S,
        reload_every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
    ) -> None:
        self.reloader = RulesReloader(
            path, windows_s, logger or log
        )  # raises RulesError if invalid
        self.engine = RulesEngine(self.reloader.rules)
        self.reload_every_s = reload_every_s
        self._clock = clock
        self._next_check = clock() + reload_every_s

    @classmethod
    def from_settings(cls, settings: Settings, **kw: Any) -> RulesRuntime:
        return cls(settings.rules_file, settings.worker.windows_s, **kw)

    def maybe_reload(self) -> bool:
        """Re-read the rules file if it changed; True when new rules took effect."""
        now = self._clock()
        if now < self._next_check:
            return False
        self._next_check = now + self.reload_every_s
        rules = self.reloader.poll()
        if rules is None:
            return False
        self.engine = RulesEngine(rules)
        return True

    def __call__(
        self, agg: WindowAggregate, state: dict[str, Any] | None
    ) -> tuple[list[Alert], dict[str, Any] | None]:
        """Judge one final window; the state to store is None when no rule judges it."""
        self.maybe_reload()
        if not self.engine.applies(agg):
            return [], None
        st = state if state is not None else new_state()
        return self.engine.evaluate(agg, st), st

    def sweep(self, state: dict[str, Any], now: datetime) -> list[Alert]:
        """See RulesEngine.sweep: resolve alerts of a dimension set that went quiet."""
        return self.engine.sweep(state, now)
