"""The rules file: defaults, errors that name file, rule and key, hot reload."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from llmpulse.config import Settings
from llmpulse.config.worker import WorkerConfig
from llmpulse.streams.rules import (
    AnomalyRule,
    BudgetRule,
    RulesError,
    RulesReloader,
    SloRule,
    ThresholdRule,
    load_rules,
    parse_rules,
)
from llmpulse.streams.rules.hook import RulesRuntime
from tests.rules_helpers import calls


def test_defaults_carry_the_operational_targets() -> None:
    rules = load_rules(None).by_name()
    # success >= 99% is an SLO over 30 days (issue 14), per model and per app
    sr = rules["success_rate"]
    assert isinstance(sr, SloRule) and (sr.objective, sr.period) == (0.99, 30 * 86400)
    assert sr.dim_sets == (("model",), ("app",))
    assert [(a.long, a.short, a.burn_rate, a.severity) for a in sr.alerts] == [
        (3600, 300, 14.4, "critical"),
        (21600, 1800, 6, "warning"),
    ]
    lat = rules["latency_avg"]
    assert isinstance(lat, ThresholdRule) and (lat.metric, lat.warning) == ("latency_avg_ms", 2000)
    tok = rules["daily_tokens"]
    assert isinstance(tok, BudgetRule) and (tok.metric, tok.critical) == ("total_tokens", 100_000)
    gpu = rules["gpu_utilisation"]
    assert isinstance(gpu, ThresholdRule) and (gpu.kind, gpu.warning, gpu.by) == (
        "gpu",
        80,
        ("host", "gpu"),
    )
    ia = rules["intent_accuracy"]
    assert isinstance(ia, ThresholdRule) and (ia.direction, ia.warning) == ("below", 0.95)
    rel = rules["relevance"]
    assert isinstance(rel, ThresholdRule) and (rel.metric, rel.warning) == ("relevance_avg", 4.5)
    key = rules["key_rate"]
    assert isinstance(key, ThresholdRule)
    assert (key.metric, key.window, key.by, key.warning) == ("requests", 60, ("api_key_hash",), 100)
    assert (lat.confidence, ia.confidence, rel.confidence) == (0.99, 0.99, 0.99)
    # anomalies: seasonal (same time of day, 7 days) per model, app and key
    for name, metric in [
        ("cost_anomaly", "cost_usd"),
        ("tokens_anomaly", "total_tokens"),
        ("requests_anomaly", "requests"),
        ("error_rate_anomaly", "error_rate"),
    ]:
        a = rules[name]
        assert isinstance(a, AnomalyRule)
        assert (a.metric, a.factor, a.method, a.baseline_s) == (metric, 1.5, "seasonal", 7 * 86400)
        assert a.dim_sets == (("model",), ("app",), ("api_key_hash",))


def test_durations_and_shorthands() -> None:
    rs = parse_rules(
        """
rules:
  - {name: a, type: anomaly, metric: cost_usd, baseline: 7d, method: seasonal, bucket: 30m, window: 1m}
  - {name: b, metric: requests, warning: 5, by: model}
"""
    )
    a, b = rs.rules
    assert isinstance(a, AnomalyRule) and (a.baseline, a.bucket_s, a.window) == (
        7 * 86400,
        1800,
        60,
    )
    assert isinstance(b, ThresholdRule) and b.by == ("model",) and b.type == "threshold"


BAD = [
    # (rules yaml, pieces the message must contain)
    (
        "rules:\n  - {name: r1, metric: error_rate, warning: 0.1, colour: red}\n",
        ["rule 'r1'", "key 'colour'", "unknown key"],
    ),
    (
        "rules:\n  - {name: r1, metric: errorrate, warning: 0.1}\n",
        ["rule 'r1'", "key 'metric'", "'errorrate' is not a calls metric"],
    ),
    (
        "rules:\n  - {name: r1, metric: error_rate}\n",
        ["rule 'r1'", "needs 'warning' or 'critical'"],
    ),
    (
        "rules:\n  - {name: r1, metric: error_rate, warning: 0.1, window: 30}\n",
        ["rule 'r1'", "key 'window'", "30 s is not a worker window"],
    ),
    (
        "rules:\n  - {name: r1, metric: error_rate, warning: 0.1, window: soon}\n",
        ["rule 'r1'", "key 'window'", "not a duration"],
    ),
    (
        "rules:\n  - {name: r1, metric: error_rate, warning: 0.1, by: [region]}\n",
        ["rule 'r1'", "key 'by'", "unknown calls dimension 'region'"],
    ),
    (
        "rules:\n  - {name: r1, metric: error_rate, warning: 0.2, critical: 0.1}\n",
        ["rule 'r1'", "'critical' must be >= 'warning'"],
    ),
    (
        "rules:\n  - {name: r1, type: anomaly, metric: requests, factor: 0.9}\n",
        ["rule 'r1'", "key 'factor'", "greater than 1"],
    ),
    (
        "rules:\n  - {name: r1, type: budget, metric: latency_avg_ms, warning: 5}\n",
        ["rule 'r1'", "key 'metric'", "cannot be budgeted"],
    ),
    (
        "rules:\n  - {name: r1, type: alarm}\n",
        ["rule 'r1'", "key 'type'", "threshold, slo, anomaly, budget, composite"],
    ),
    (
        "rules:\n  - {name: c, type: composite, all_of: [nope]}\n",
        ["rule 'c'", "key 'all_of'", "no rule named 'nope'"],
    ),
    (
        "rules:\n  - {metric: requests, warning: 1}\n",
        ["rules[0]", "key 'name'", "required key is missing"],
    ),
    (
        "rules:\n  - {name: a, metric: requests, warning: 1}\n  - {name: a, metric: errors, warning: 1}\n",
        ["rule 'a'", "used twice"],
    ),
    ("rule:\n  - {name: a}\n", ["key 'rule'", "unknown key"]),
    ("rules: [\n", ["not valid YAML"]),
]


@pytest.mark.parametrize(("text", "pieces"), BAD)
def test_errors_name_the_file_the_rule_and_the_key(
    tmp_path: Path, text: str, pieces: list[str]
) -> None:
    path = tmp_path / "my-rules.yaml"
    path.write_text(text)
    with pytest.raises(RulesError) as exc:
        load_rules(path)
    msg = str(exc.value)
    assert str(path) in msg
    for piece in pieces:
        assert piece in msg, msg


def test_missing_file_and_composite_dimension_mismatch(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="rules file not found"):
        load_rules(tmp_path / "nope.yaml")
    with pytest.raises(RulesError, match="members judge different dimension sets"):
        parse_rules(
            """
rules:
  - {name: a, metric: requests, warning: 1, by: [model]}
  - {name: b, metric: requests, warning: 1}
  - {name: c, type: composite, any_of: [a, b]}
"""
        )
    with pytest.raises(RulesError, match="members judge different windows"):
        parse_rules(
            """
rules:
  - {name: a, metric: requests, warning: 1, window: 10}
  - {name: b, metric: requests, warning: 1}
  - {name: c, type: composite, all_of: [a, b]}
"""
        )


def test_windows_are_checked_against_the_worker_windows() -> None:
    text = "rules:\n  - {name: r, metric: requests, warning: 1, window: 300}\n"
    rule = parse_rules(text, windows_s=[60, 300]).rules[0]
    assert isinstance(rule, ThresholdRule) and rule.window == 300
    with pytest.raises(RulesError, match=r"worker\.windows_s: \[10, 60\]"):
        parse_rules(text)


def _bump(path: Path) -> None:
    st = path.stat()  # a new mtime even on a file system with coarse timestamps
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def test_hot_reload_keeps_old_rules_on_a_bad_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - {name: a, metric: requests, warning: 100}\n")
    reloader = RulesReloader(path)
    assert [r.name for r in reloader.rules.rules] == ["a"]
    assert reloader.poll() is None  # unchanged

    path.write_text(
        "rules:\n  - {name: a, metric: requests, warning: 200}\n  - {name: b, metric: errors, warning: 1}\n"
    )
    _bump(path)
    new = reloader.poll()
    assert new is not None and [r.name for r in new.rules] == ["a", "b"]
    assert reloader.rules is new

    path.write_text("rules:\n  - {name: a, metric: requests, warning: 100, colour: red}\n")
    _bump(path)
    with caplog.at_level(logging.ERROR):
        assert reloader.poll() is None
    assert reloader.rules is new  # the previous good rules stay
    assert reloader.last_error is not None and "key 'colour'" in reloader.last_error
    assert any(
        "keeping the 2 previous rules" in rec.getMessage() and "colour" in rec.getMessage()
        for rec in caplog.records
    )
    assert reloader.poll() is None  # the same bad file is not re-read

    path.unlink()
    assert reloader.poll() is None and reloader.rules is new
    path.write_text("rules: []\n")
    new2 = reloader.poll()
    assert new2 is not None and new2.rules == () and reloader.last_error is None


def test_reloader_without_a_file_serves_the_defaults() -> None:
    reloader = RulesReloader(None)
    assert len(reloader.rules.rules) >= 10
    assert reloader.poll() is None


def test_runtime_from_settings_reloads_and_judges(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - {name: a, metric: requests, warning: 100, by: [model]}\n")
    clock = [0.0]
    rt = RulesRuntime.from_settings(Settings(rules_file=path), clock=lambda: clock[0])
    ten = calls(0, 150, window=10, dims={"model": "m"})
    assert rt(ten, None) == ([], None)  # no rule judges 10 s windows
    alerts, state = rt(calls(0, 150, dims={"model": "m"}), None)
    assert [a.rule for a in alerts] == ["a"] and state is not None
    path.write_text("rules:\n  - {name: a, metric: requests, warning: 500, by: [model]}\n")
    _bump(path)
    assert rt(calls(1, 150, dims={"model": "m"}), state) == ([], state)  # not re-read yet
    clock[0] = 6.0
    alerts, state = rt(calls(2, 150, dims={"model": "m"}), state)  # re-read: 150 < 500
    alerts2, state = rt(calls(3, 150, dims={"model": "m"}), state)
    assert [(a.rule, a.state) for a in alerts + alerts2] == [("a", "resolved")]
    with pytest.raises(RulesError, match="worker window"):
        RulesRuntime.from_settings(Settings(rules_file=path, worker=WorkerConfig(windows_s=[30])))


@pytest.mark.parametrize(
    "text, reason",
    [
        ("rules: " + "[" * 100_000, "nested deeper than"),
        ("a: &a [x, x, x, x, x, x, x, x, x, x]\n"
         + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                   for p, c in zip("abcdefgh", "bcdefghi", strict=True)), "aliases counted as expanded"),
    ],
)
def test_a_pathological_rules_file_is_a_rules_error(text: str, reason: str) -> None:
    """Deep nesting and alias bombs give the clean error naming the file, never a RecursionError."""
    with pytest.raises(RulesError) as err:
        parse_rules(text, "bomb.yaml")
    assert "bomb.yaml" in str(err.value) and reason in str(err.value)
