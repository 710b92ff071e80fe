"""Shared helpers of the rules tests: aggregates of known windows, a JSON-round-tripping runner."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from llmpulse.schemas import Alert, WindowAggregate, aggregate_id, dimensions_key
from llmpulse.streams.rules import RulesEngine, new_state, parse_rules

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def agg(
    i: int,
    *,
    window: int = 60,
    kind: str = "calls",
    dims: dict[str, str] | None = None,
    start: datetime | None = None,
    **fields: Any,
) -> WindowAggregate:
    """The aggregate of window number ``i`` after T0 (or starting at ``start``)."""
    s = start if start is not None else T0 + timedelta(seconds=i * window)
    d = dims or {}
    return WindowAggregate(
        aggregate_id=aggregate_id(kind, window, int(s.timestamp() * 1000), dimensions_key(d)),
        kind=kind,  # type: ignore[arg-type]
        window_s=window,
        window_start=s,
        window_end=s + timedelta(seconds=window),
        dimensions=d,
        dims_key=dimensions_key(d),
        **fields,
    )


def calls(i: int, requests: int, errors: int = 0, **kw: Any) -> WindowAggregate:
    rate = errors / requests if requests else 0.0
    return agg(i, requests=requests, errors=errors, error_rate=rate, success_rate=1 - rate, **kw)


def engine(yaml_text: str, windows_s: Iterable[int] = (10, 60)) -> RulesEngine:
    return RulesEngine(parse_rules(yaml_text, "test.yaml", windows_s))


class Runner:
    """Feeds aggregates to an engine the way the worker does: state stored as JSON between windows."""

    def __init__(self, eng: RulesEngine) -> None:
        self.engine = eng
        self.states: dict[str, str] = {}
        self.alerts: list[Alert] = []

    def feed(self, *aggs: WindowAggregate) -> list[Alert]:
        out: list[Alert] = []
        for a in aggs:
            raw = self.states.get(a.dims_key)
            state = json.loads(raw) if raw is not None else new_state()
            out += self.engine.evaluate(a, state)
            self.states[a.dims_key] = json.dumps(state)
        self.alerts += out
        return out

    def events(self) -> list[tuple[str, str, str]]:
        return [(a.rule, a.state, a.severity) for a in self.alerts]
