"""The worker's entry point to the rules: load from settings, hot reload, judge, sweep.

``RulesRuntime`` is what the worker's finalizer holds (the ``RulesHook`` protocol):
``judge(aggregates, stored)`` judges the final windows of a publish in bulk (one pass per
window and rule: RulesEngine.judge) and ``sweep`` resolves alerts of quiet dimension sets.
The type lives here, on the rules side, so the rules never import the worker. Calling it
with one aggregate (``runtime(aggregate, stored_state_or_None) -> (alerts,
state_to_store_or_None)``) judges that one the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from llmpulse.config import Settings
from llmpulse.schemas import Alert, WindowAggregate
from llmpulse.streams.rules.engine import Judged, RulesEngine, State
from llmpulse.streams.rules.loader import DEFAULT_WINDOWS_S, RulesReloader

log = logging.getLogger(__name__)


class RulesHook(Protocol):
    """What the worker's finalizer calls with the final aggregates it publishes."""

    def judge(
        self, aggregates: Iterable[WindowAggregate], stored: Callable[[WindowAggregate], State | None]
    ) -> list[Judged]:
        """See RulesEngine.judge: one ``Judged`` (alerts, state to store) per aggregate judged."""
        ...

    def sweep(self, state: State, now: datetime) -> list[Alert]:
        """See RulesEngine.sweep."""
        ...


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

    def judge(
        self, aggregates: Iterable[WindowAggregate], stored: Callable[[WindowAggregate], State | None]
    ) -> list[Judged]:
        """Judge final windows in bulk (RulesEngine.judge), with the rules in effect now:
        the rules file is checked once per call, so a call's windows see one rule set."""
        self.maybe_reload()
        return self.engine.judge(aggregates, stored)

    def __call__(
        self, agg: WindowAggregate, state: State | None
    ) -> tuple[list[Alert], State | None]:
        """Judge one final window; the state to store is None when no rule judges it."""
        judged = self.judge((agg,), lambda _: state)
        if not judged:
            return [], None
        return judged[0].alerts, judged[0].state

    def sweep(self, state: dict[str, Any], now: datetime) -> list[Alert]:
        """See RulesEngine.sweep: resolve alerts of a dimension set that went quiet."""
        return self.engine.sweep(state, now)
