"""`llmpulse rules backtest`: stored windows replayed through a rules file, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from llmpulse.analysis.query_server import QueryServer
from llmpulse.config import load_settings
from llmpulse.embedded.store import open_store
from llmpulse.schemas import WindowAggregate
from llmpulse.sinks.clickhouse.migrate import migrate
from llmpulse.streams.rules import parse_rules
from llmpulse.streams.rules.backtest import backtest
from tests.rules_helpers import agg, calls
from tests.test_dashboard_api import write

END = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
START = END - timedelta(hours=3)
RULES = """
rules:
  - {name: errs, metric: error_rate, warning: 0.1, critical: 0.3, by: [model], min_requests: 20}
  - {name: traffic, type: anomaly, metric: requests, method: rolling, baseline: 1h, by: [model],
     min_baseline_windows: 10}
"""


def windows() -> list[WindowAggregate]:
    """3 hours of 60 s windows for model m: 100 calls a minute; from minute 150, 10 minutes
    with 40 errors in 100; at minute 100 one minute of 1000 calls; and a 10 s window the
    rules do not judge."""
    out = []
    for i in range(180):
        start = START + timedelta(minutes=i)
        errors = 40 if 150 <= i < 160 else 0
        req = 1000 if i == 100 else 100
        out.append(calls(0, req, errors, dims={"model": "m"}, start=start))
    # a window of another size and a global window: not judged by these rules
    out.append(agg(0, window=10, start=START, dims={"model": "m"}, requests=5))
    return out


def test_backtest_counts_what_would_have_fired_per_rule_and_day() -> None:
    rules = parse_rules(RULES, "tuning.yaml")
    res = backtest(rules, windows(), START + timedelta(hours=1), END)
    assert res.windows == 120  # the first hour only warms up
    got = {(c.rule, c.severity): (c.alerts, c.series) for c in res.by_day}
    # errs: 40 of 100 against 10%: P(X >= 40 | 100, 0.1) = 2.9e-15, a warning; against 30%:
    # P(X >= 40 | 100, 0.3) = 0.021 > 0.01, no evidence of critical. One incident, one firing.
    # traffic: 1000 calls against a rolling median of 100 (Poisson P(X >= 1000 | 100) ~ 0) and
    # >= 1.5x: a warning (the rule has no critical_factor).
    assert got[("errs", "warning")] == (1, 1) and ("errs", "critical") not in got
    assert got[("traffic", "warning")] == (1, 1)
    assert [a.rule for a in res.examples] == ["errs", "traffic"]


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("backtest")
    path = tmp / "llmpulse.yaml"
    # query_max_rows 50: the backtest reads 180 windows in pages
    path.write_text(yaml.safe_dump({"data_dir": str(tmp / "data"), "clickhouse": {"query_max_rows": 50}}))
    (tmp / "tuning.yaml").write_text(RULES)
    settings = load_settings(path, environ={})
    ch = settings.clickhouse
    store = open_store(ch, settings.data_dir, {"role": "test-sink"})
    try:
        migrate(store.client, ch)
        qs = QueryServer(store.client, ch.database, ch.query_max_rows, ch.query_max_seconds).start()
        assert store.lock is not None
        store.lock.write_info({"role": "test-sink", "query_url": qs.url})
        rows = windows()
        write(store.client, "llm_aggregates", rows)
        # a backfilled correction of minute 100 (revision 2, same aggregate id): read FINAL,
        # the backtest judges the corrected window only
        fixed = rows[100].model_copy(update={"requests": 100, "qps": 100 / 60, "revision": 2})
        write(store.client, "llm_aggregates", [fixed])
        yield path
        qs.stop()
    finally:
        store.close()


def cli(config: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmpulse", "--config", str(config), *argv],
                          capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})  # fmt: skip


def test_cli_backtest_reads_the_stored_windows_in_pages(config: Path) -> None:
    rules = str(config.parent / "tuning.yaml")
    until = END.strftime("%Y-%m-%dT%H:%M:%SZ")
    r = cli(config, "rules", "backtest", "--rules", rules, "--since", "2h", "--until", until, "--warmup", "1h",
            "--format", "json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["windows"] == 120
    got = {(c["rule"], c["severity"]): c["alerts"] for c in rep["by_day"]}
    # minute 100 was corrected to 100 calls: no traffic anomaly; the error incident fires once
    assert got == {("errs", "warning"): 1}
    table = cli(config, "rules", "backtest", "--rules", rules, "--since", "2h", "--until", until, "--warmup", "1h")
    assert table.returncode == 0, table.stderr
    assert "120 windows judged" in table.stdout and "first alert of each rule:" in table.stdout
    line = next(x for x in table.stdout.splitlines() if x.startswith("total"))
    assert line.split() == ["total", "1", "1"]
    bad = cli(config, "rules", "check", str(config))  # the config file is not a rules file
    assert bad.returncode == 1 and "unknown key" in bad.stderr
    ok = cli(config, "rules", "check", rules)
    assert ok.returncode == 0 and "2 rules, valid" in ok.stdout
