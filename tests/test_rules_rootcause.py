"""Root cause hints: the finer dimension value that carries a global deviation."""

from __future__ import annotations

from llmpulse.schemas import WindowAggregate
from llmpulse.streams.rules.rootcause import explain, root_cause
from tests.rules_helpers import Runner, calls, engine


def _window() -> tuple[WindowAggregate, list[WindowAggregate]]:
    parent = calls(0, 1000, 100, latency_sum_ms=500_000.0, cost_usd=10.0)
    children = [
        # models: gpt-4o has 10% of the calls and 80% of the errors
        calls(0, 100, 80, dims={"model": "gpt-4o"}, cost_usd=6.0),
        calls(0, 900, 20, dims={"model": "llama"}, cost_usd=4.0),
        # one app carries everything: no information
        calls(0, 1000, 100, dims={"app": "chat"}, cost_usd=10.0),
        # keys: errors spread like the traffic
        calls(0, 500, 50, dims={"api_key_hash": "k1"}, cost_usd=5.0),
        calls(0, 500, 50, dims={"api_key_hash": "k2"}, cost_usd=5.0),
        # another window, another kind: ignored
        calls(1, 10, 10, dims={"model": "other"}),
    ]
    return parent, children


def test_names_the_member_with_the_excess_share() -> None:
    parent, children = _window()
    assert root_cause("error_rate", parent, children) == {
        "dimension": "model",
        "value": "gpt-4o",
        "metric": "errors",
        "share": 0.8,
        "traffic_share": 0.1,
    }
    cost = root_cause("cost_usd", parent, children)
    assert cost is not None and (cost["dimension"], cost["value"], cost["share"]) == (
        "model",
        "gpt-4o",
        0.6,
    )
    assert root_cause("relevance_avg", parent, children) is None
    assert (
        root_cause("error_rate", parent, [c for c in children if "model" not in c.dimensions])
        is None
    )


def test_explain_adds_the_cause_to_a_firing_alert() -> None:
    parent, children = _window()
    r = Runner(engine("rules:\n  - {name: errs, metric: error_rate, warning: 0.05}\n"))
    [alert] = r.feed(parent)
    explained = explain(alert, parent, children)
    assert explained.root_cause is not None and explained.root_cause["value"] == "gpt-4o"
    assert explained.summary.endswith("; mostly model=gpt-4o (80% of errors, 10% of calls)")
    assert explained.alert_id == alert.alert_id
