"""Root cause hints: which finer dimension value carries most of a deviation.

Given the final aggregate of a window for a coarse dimension set (global, or e.g.
``provider=openai``) and the aggregates of the same window one dimension finer (model,
app, user, api_key_hash...), name the member that contributes most to the alerted
metric, with its share. For ratio metrics (error rate, latency) the score is the excess
of the member's share of the numerator (errors, latency) over its share of the calls, so
a model with 80% of the errors but 10% of the calls stands out, while an app that simply
carries all traffic does not. For sums (requests, tokens, cost) the score is the share.

The worker's finalizer has, for one closed window, the final aggregates of every dimension
set and the alerts the rules made of them; ``explain_window`` gives each firing alert on a
coarse dimension set its ``root_cause`` and a clause in its summary, so a person (or an
action rule matching on the root cause) can target it::

    alerts = explain_window(final_aggregates_of_the_window, alerts)

Its cost is linear in the window's aggregates, whatever the number of alerts: they are
indexed once (``WindowIndex``: the aggregate of a dimension set, and the sets one dimension
finer, by key), not scanned once per alert; a window of 10,000 users' sets with an alert on
each of hundreds of them made that quadratic. A caller explaining the alerts of one window
in several calls passes one ``WindowIndex`` of it to each, so it is built once.

Alerts whose aggregate is missing, resolved alerts and metrics without a contribution
(see ``CONTRIBUTION``) come back unchanged; order is kept. It lives with the rules, not
with the actions that read its result, so the worker depends on the rules only (no
``streams`` -> ``actions`` -> ``streams`` import cycle).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from llmpulse.schemas import Alert, WindowAggregate

FINER_DIMENSIONS = ("model", "provider", "app", "user", "api_key_hash", "operation", "host", "gpu")
# metric -> (numerator field, traffic field or None for plain sums)
CONTRIBUTION: dict[str, tuple[str, str | None]] = {
    "error_rate": ("errors", "requests"),
    "success_rate": ("errors", "requests"),
    "burn_rate": ("errors", "requests"),  # SLO rules: the error budget burns with errors
    "errors": ("errors", None),
    "latency_avg_ms": ("latency_sum_ms", "requests"),
    "latency_p50_ms": ("latency_sum_ms", "requests"),
    "latency_p95_ms": ("latency_sum_ms", "requests"),
    "latency_p99_ms": ("latency_sum_ms", "requests"),
    "ttft_p95_ms": ("latency_sum_ms", "requests"),
    "requests": ("requests", None),
    "qps": ("requests", None),
    "prompt_tokens": ("prompt_tokens", None),
    "completion_tokens": ("completion_tokens", None),
    "total_tokens": ("total_tokens", None),
    "cost_usd": ("cost_usd", None),
    "unpriced_requests": ("unpriced_requests", None),
}


MIN_SCORE = 0.1  # a member's excess share (or share, for sums) below this explains nothing
DimensionItems = frozenset[tuple[str, str]]  # a dimension set as a key: equal sets, equal keys
Level = tuple[str, int, datetime, int]  # kind, window_s, window_start, number of dimensions


class WindowIndex:
    """The final aggregates of a window (or of several), indexed for root causes.

    Each sort of look-up (a parent; the sets one dimension finer than a parent, per kind,
    window and number of dimensions) scans the aggregates the first time, as one look-up
    costs least that way, and builds its index the second time, in one pass, for every
    later one: linear in the aggregates whether one alert or thousands are explained."""

    def __init__(self, aggregates: Iterable[WindowAggregate]) -> None:
        self.aggregates = list(aggregates)
        self._parents: dict[DimensionItems, list[WindowAggregate]] | None = None
        self._parent_scanned = False
        self._finer: dict[Level, dict[DimensionItems, list[tuple[str, WindowAggregate]]]] = {}
        self._finer_scanned: set[Level] = set()

    def parent(
        self, window_start: datetime, window_end: datetime, dimensions: dict[str, str]
    ) -> WindowAggregate | None:
        """The aggregate of ``dimensions`` in that window: the first of kind calls, else the first of any kind."""
        if self._parents is not None:
            found: Iterable[WindowAggregate] = self._parents.get(frozenset(dimensions.items()), ())
        elif not self._parent_scanned:
            self._parent_scanned = True
            found = (a for a in self.aggregates if a.dimensions == dimensions)
        else:
            self._parents = {}
            for a in self.aggregates:
                self._parents.setdefault(frozenset(a.dimensions.items()), []).append(a)
            found = self._parents.get(frozenset(dimensions.items()), ())
        first = None
        for a in found:
            if a.window_start == window_start and a.window_end == window_end:
                if a.kind == "calls":
                    return a
                if first is None:
                    first = a
        return first

    def finer(self, parent: WindowAggregate) -> dict[str, list[WindowAggregate]]:
        """The aggregates of ``parent``'s kind and window whose dimensions are its own plus exactly
        one more, grouped by that dimension, groups and members in the order of the aggregates."""
        level = (parent.kind, parent.window_s, parent.window_start, len(parent.dimensions) + 1)
        by_coarser = self._finer.get(level)
        pdims = parent.dimensions
        pairs: Iterable[tuple[str, WindowAggregate]]
        if by_coarser is None and level not in self._finer_scanned:
            self._finer_scanned.add(level)
            pairs = (
                (next(k for k in a.dimensions if k not in pdims), a)
                for a in self._of_level(level)
                if pdims.items() <= a.dimensions.items()
            )
        else:
            if by_coarser is None:
                by_coarser = self._finer[level] = {}
                for a in self._of_level(level):
                    items = frozenset(a.dimensions.items())
                    for item in items:  # under each set one dimension coarser
                        by_coarser.setdefault(items - {item}, []).append((item[0], a))
            pairs = by_coarser.get(frozenset(pdims.items()), ())
        groups: dict[str, list[WindowAggregate]] = {}
        for dim, a in pairs:
            groups.setdefault(dim, []).append(a)
        return groups

    def _of_level(self, level: Level) -> Iterable[WindowAggregate]:
        kind, window_s, window_start, n = level
        for a in self.aggregates:
            if len(a.dimensions) == n and a.kind == kind and a.window_s == window_s and a.window_start == window_start:
                yield a


def root_cause(
    metric: str,
    parent: WindowAggregate,
    children: Iterable[WindowAggregate],
    min_score: float = MIN_SCORE,
) -> dict[str, str | float] | None:
    """The finer dimension value contributing most to ``metric`` in ``parent``; None if none stands out.

    ``children``: aggregates of the same kind and window whose dimensions are the parent's
    plus exactly one more (others are ignored). Returns ``{"dimension", "value", "metric",
    "share", "traffic_share"}`` (shares in 0..1), fitting ``Alert.root_cause``.
    """
    if metric not in CONTRIBUTION:
        return None
    return _strongest(metric, parent, WindowIndex(children).finer(parent), min_score)


def _strongest(
    metric: str, parent: WindowAggregate, groups: dict[str, list[WindowAggregate]], min_score: float
) -> dict[str, str | float] | None:
    """`root_cause` of the children grouped by their extra dimension (`WindowIndex.finer`)."""
    spec = CONTRIBUTION.get(metric)
    if spec is None:
        return None
    num_field, traffic_field = spec
    total = float(getattr(parent, num_field))
    traffic_total = float(getattr(parent, traffic_field)) if traffic_field else 0.0
    if total <= 0:
        return None
    best: tuple[float, float, float, str, str] | None = None
    for dim, members in groups.items():
        if len(members) < 2:
            continue  # one value carries everything: no information
        rank = FINER_DIMENSIONS.index(dim) if dim in FINER_DIMENSIONS else len(FINER_DIMENSIONS)
        for c in members:
            share = float(getattr(c, num_field)) / total
            tshare = (
                float(getattr(c, traffic_field)) / traffic_total
                if traffic_field and traffic_total
                else 0.0
            )
            score = share - tshare if traffic_field else share
            key = (score, -rank, share, dim, c.dimensions[dim])
            if best is None or key[:3] > best[:3]:
                best = key
    if best is None or best[0] < min_score:
        return None
    score, _, share, dim, value = best
    out: dict[str, str | float] = {
        "dimension": dim,
        "value": value,
        "metric": num_field,
        "share": round(share, 4),
    }
    if traffic_field:
        out["traffic_share"] = round(share - score, 4)
    return out


def explain(alert: Alert, parent: WindowAggregate, children: Iterable[WindowAggregate]) -> Alert:
    """The alert with ``root_cause`` set and a clause added to its summary (firing alerts only)."""
    if alert.state != "firing":
        return alert
    return _with_cause(alert, root_cause(alert.metric, parent, children))


def _with_cause(alert: Alert, cause: dict[str, str | float] | None) -> Alert:
    if cause is None:
        return alert
    clause = f"; mostly {cause['dimension']}={cause['value']} ({float(cause['share']) * 100:.0f}% of {cause['metric']}"
    if "traffic_share" in cause:
        clause += f", {float(cause['traffic_share']) * 100:.0f}% of calls"
    clause += ")"
    return alert.model_copy(
        update={"root_cause": cause, "summary": (alert.summary + clause)[:4096]}
    )


def explain_window(aggregates: Iterable[WindowAggregate] | WindowIndex, alerts: Sequence[Alert]) -> list[Alert]:
    """The alerts, each firing one with a root cause when a finer dimension value stands out.

    ``aggregates``: the window's final aggregates, or a ``WindowIndex`` of them (for a window
    whose alerts come in several calls: built once, not once per call)."""
    index = aggregates if isinstance(aggregates, WindowIndex) else WindowIndex(aggregates)
    out: list[Alert] = []
    for alert in alerts:
        if alert.state != "firing" or alert.root_cause or alert.metric not in CONTRIBUTION:
            out.append(alert)
            continue
        parent = index.parent(alert.window_start, alert.window_end, alert.dimensions)
        if parent is None:
            out.append(alert)
            continue
        out.append(_with_cause(alert, _strongest(alert.metric, parent, index.finer(parent), MIN_SCORE)))
    return out
