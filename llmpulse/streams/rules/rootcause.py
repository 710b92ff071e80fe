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

Alerts whose aggregate is missing, resolved alerts and metrics without a contribution
(see ``CONTRIBUTION``) come back unchanged; order is kept. It lives with the rules, not
with the actions that read its result, so the worker depends on the rules only (no
``streams`` -> ``actions`` -> ``streams`` import cycle).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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


def root_cause(
    metric: str,
    parent: WindowAggregate,
    children: Iterable[WindowAggregate],
    min_score: float = 0.1,
) -> dict[str, str | float] | None:
    """The finer dimension value contributing most to ``metric`` in ``parent``; None if none stands out.

    ``children``: aggregates of the same kind and window whose dimensions are the parent's
    plus exactly one more. Returns ``{"dimension", "value", "metric", "share",
    "traffic_share"}`` (shares in 0..1), fitting ``Alert.root_cause``.
    """
    spec = CONTRIBUTION.get(metric)
    if spec is None:
        return None
    num_field, traffic_field = spec
    total = float(getattr(parent, num_field))
    traffic_total = float(getattr(parent, traffic_field)) if traffic_field else 0.0
    if total <= 0:
        return None
    pdims = parent.dimensions
    groups: dict[str, list[WindowAggregate]] = {}
    for c in children:
        if (
            c.kind != parent.kind
            or c.window_s != parent.window_s
            or c.window_start != parent.window_start
        ):
            continue
        if len(c.dimensions) != len(pdims) + 1 or any(
            c.dimensions.get(k) != v for k, v in pdims.items()
        ):
            continue
        (extra,) = (k for k in c.dimensions if k not in pdims)
        groups.setdefault(extra, []).append(c)
    best: tuple[float, float, float, str, str] | None = None
    for dim, members in groups.items():
        if len(members) < 2:
            continue  # one value carries everything: no information
        for c in members:
            share = float(getattr(c, num_field)) / total
            tshare = (
                float(getattr(c, traffic_field)) / traffic_total
                if traffic_field and traffic_total
                else 0.0
            )
            score = share - tshare if traffic_field else share
            rank = FINER_DIMENSIONS.index(dim) if dim in FINER_DIMENSIONS else len(FINER_DIMENSIONS)
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
    cause = root_cause(alert.metric, parent, children)
    if cause is None:
        return alert
    clause = f"; mostly {cause['dimension']}={cause['value']} ({float(cause['share']) * 100:.0f}% of {cause['metric']}"
    if "traffic_share" in cause:
        clause += f", {float(cause['traffic_share']) * 100:.0f}% of calls"
    clause += ")"
    return alert.model_copy(
        update={"root_cause": cause, "summary": (alert.summary + clause)[:4096]}
    )


def _parent_of(alert: Alert, aggregates: Sequence[WindowAggregate]) -> WindowAggregate | None:
    found = [
        a
        for a in aggregates
        if a.window_start == alert.window_start
        and a.window_end == alert.window_end
        and a.dimensions == alert.dimensions
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
