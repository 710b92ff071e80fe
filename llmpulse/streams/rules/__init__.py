"""Rules, anomaly baselines and the alert lifecycle of the stream worker (pure logic, no Kafka)."""

from llmpulse.streams.rules.engine import STATE_VERSION, RulesEngine, has_open_alerts, new_state
from llmpulse.streams.rules.loader import RulesError, RulesReloader, load_rules, parse_rules
from llmpulse.streams.rules.model import (
    AnomalyRule,
    BudgetRule,
    CompositeRule,
    Rule,
    RuleSet,
    ThresholdRule,
)

__all__ = [
    "STATE_VERSION",
    "AnomalyRule",
    "BudgetRule",
    "CompositeRule",
    "Rule",
    "RuleSet",
    "RulesEngine",
    "RulesError",
    "RulesReloader",
    "ThresholdRule",
    "has_open_alerts",
    "load_rules",
    "new_state",
    "parse_rules",
]
