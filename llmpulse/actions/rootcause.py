"""Root-cause hints for the alerts of one window (issue 10, item 5): the worker's adaptor.

The finalizer has, for one closed window, the final aggregates of every dimension set
(global, model, provider, app, user, api_key_hash...) and the alerts the rules made of
them. `explain_window` gives each firing alert on a coarse dimension set (global, a
provider) its `root_cause` - the finer dimension value carrying most of the deviation,
with its share - and a clause in its summary, so a person (or an action rule matching
on the root cause) can target it::

    alerts = explain_window(final_aggregates_of_the_window, alerts)

Alerts whose aggregate is missing, resolved alerts and metrics without a contribution
(see `CONTRIBUTION`) come back unchanged; order is kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from llmpulse.schemas import Alert, WindowAggregate
from llmpulse.streams.rules.rootcause import CONTRIBUTION, explain


def _parent_of(alert: Alert, aggregates: Sequence[WindowAggregate]) -> WindowAggregate | None:
    found = [
        a
        for a in aggregates
        if a.window_start == alert.window_start and a.window_end == alert.window_end and a.dimensions == alert.dimensions
    ]
    if not found:
        return None
    calls = [a for a in found if a.kind == "calls"]
    return (calls or found)[0]


def explain_window(aggregates: Iterable[WindowAggregate], alerts: Sequence[Alert]) -> list[Alert]:
    """The alerts, each firing one with a root cause when a finer dimension value stands out."""
    aggs = list(aggregates)
    out: list[Alert] = []
    for alert in alerts:
        if alert.state != "firing" or alert.root_cause or alert.metric not in CONTRIBUTION:
            out.append(alert)
            continue
        parent = _parent_of(alert, aggs)
        if parent is None:
            out.append(alert)
            continue
        out.append(explain(alert, parent, aggs))
    return out
