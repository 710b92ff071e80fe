"""Rules, anomaly baselines and the alert lifecycle of the stream worker (pure logic, no Kafka)."""

from llmpulse.streams.rules.engine import (
    STATE_VERSION,
    RulesEngine,
    has_open_alerts,
    migrate_state,
    new_state,
)
from llmpulse.streams.rules.loader import RulesError, RulesReloader, load_rules, parse_rules
from llmpulse.streams.rules.model import (
    AnomalyRule,
    BudgetRule,
    CompositeRule,
    Rule,
    RuleSet,
    SloRule,
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
    "SloRule",
    "ThresholdRule",
    "has_open_alerts",
    "load_rules",
    "migrate_state",
    "new_state",
    "parse_rules",
]
