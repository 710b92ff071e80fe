"""`llmpulse query` and `llmpulse report` as users run them: subprocesses against a store whose
owner (this process, serving queries the way the sink does) answers for them."""

from __future__ import annotations

import csv
import io
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
from llmpulse.schemas import CallEvent
from llmpulse.schemas.alert import Alert, alert_fingerprint
from llmpulse.sinks.clickhouse.migrate import migrate
from tests.test_dashboard_api import write

END = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
UNTIL = END.strftime("%Y-%m-%dT%H:%M:%SZ")


def calls() -> list[CallEvent]:
    out = []
    # current hour: gpt-4o 40 calls (4 errors: 3 rate_limited, 1 timeout), mini 20 calls (0 errors)
    # previous hour: gpt-4o 20 calls (1 error), mini 20 calls
    for i in range(40):
        err = "rate_limited" if i < 3 else "timeout" if i == 3 else None
        out.append(CallEvent(event_id=f"a{i}", ts=END - timedelta(minutes=59) + timedelta(seconds=i), model="gpt-4o",
                             app="search", user=f"u{i % 2}", api_key_hash="k1", status_code=429 if err else 200,
                             error_type=err, latency_ms=100.0 + i, ttft_ms=50.0, prompt_tokens=10,
                             completion_tokens=5, cost_usd=0.01))  # fmt: skip
    for i in range(20):
        out.append(CallEvent(event_id=f"b{i}", ts=END - timedelta(minutes=30, seconds=i), model="gpt-4o-mini",
                             app="bot", user="u9", api_key_hash="k2", status_code=200, latency_ms=50.0,
                             prompt_tokens=1, completion_tokens=1, cost_usd=0.001))  # fmt: skip
    for i in range(20):
        err = "rate_limited" if i == 0 else None
        out.append(CallEvent(event_id=f"c{i}", ts=END - timedelta(minutes=90, seconds=i), model="gpt-4o",
                             app="search", user="u0", api_key_hash="k1", status_code=429 if err else 200,
                             error_type=err, latency_ms=100.0, prompt_tokens=10, completion_tokens=5, cost_usd=0.01))  # fmt: skip
        out.append(CallEvent(event_id=f"d{i}", ts=END - timedelta(minutes=90, seconds=i), model="gpt-4o-mini",
                             app="bot", user="u9", api_key_hash="k2", status_code=200, latency_ms=50.0,
                             prompt_tokens=1, completion_tokens=1, cost_usd=0.001))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("report")
    path = tmp / "llmpulse.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp / "data"), "clickhouse": {"query_max_rows": 50}}))
    settings = load_settings(path, environ={})
    ch = settings.clickhouse
    store = open_store(ch, settings.data_dir, {"role": "test-sink"})
    try:
        migrate(store.client, ch)
        qs = QueryServer(store.client, ch.database, ch.query_max_rows, ch.query_max_seconds).start()
        assert store.lock is not None
        store.lock.write_info({"role": "test-sink", "query_url": qs.url})
        write(store.client, "llm_calls", calls())
        dims = {"model": "gpt-4o"}
        write(store.client, "alerts", [
            Alert(fingerprint=alert_fingerprint("success_rate", dims), rule="success_rate", severity="warning",
                  state="firing", metric="success_rate", value=0.9, threshold=0.99, dimensions=dims,
                  window_start=END - timedelta(minutes=50), window_end=END - timedelta(minutes=49),
                  started_at=END - timedelta(minutes=49), ts=END - timedelta(minutes=49)),
        ])  # fmt: skip
        yield path
        qs.stop()
    finally:
        store.close()


def cli(config: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmpulse", "--config", str(config), *argv],
                          capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})  # fmt: skip


def test_query_refuses_writes_with_a_clear_message(config: Path) -> None:
    for sql in ("INSERT INTO llmpulse.llm_calls (event_id) VALUES ('x')", "DROP TABLE llmpulse.llm_calls",
                "ALTER TABLE llmpulse.llm_calls DELETE WHERE 1"):  # fmt: skip
        r = cli(config, "query", sql)
        assert r.returncode == 1, r
        assert "refused: queries are read-only" in r.stderr and "INSERT, ALTER, DROP" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    r = cli(config, "query", "SELECT count() FROM llmpulse.llm_calls FINAL", "--format", "json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"count()": 100}  # nothing was written


def test_query_cuts_an_over_limit_select(config: Path) -> None:
    r = cli(config, "query", "SELECT arrayJoin(range(1000)) AS number", "--format", "csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert rows[0] == ["number"] and len(rows) == 51  # clickhouse.query_max_rows: 50
    assert "result cut at 50 rows" in r.stderr
    r = cli(config, "query", "SELECT arrayJoin(range(1000)) AS number", "--max-rows", "5")
    assert r.returncode == 0 and "(5 rows" in r.stdout and "cut at 5 rows" in r.stderr
    r = cli(config, "query", "SELECT model, count() AS n FROM llmpulse.llm_calls FINAL GROUP BY model ORDER BY model")
    assert r.stdout.splitlines()[:4] == ["model         n", "-----------  --", "gpt-4o       60", "gpt-4o-mini  40"]
    assert "cut" not in r.stderr


def test_report_by_model_against_the_previous_period(config: Path) -> None:
    r = cli(config, "report", "--since", "1h", "--until", UNTIL, "--by", "model", "--format", "json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    g = {x["name"]: x for x in rep["groups"]}
    assert [x["name"] for x in rep["groups"]] == ["gpt-4o", "gpt-4o-mini"]
    cur, prev = g["gpt-4o"]["current"], g["gpt-4o"]["previous"]
    assert (cur["requests"], cur["errors"], prev["requests"], prev["errors"]) == (40, 4, 20, 1)
    assert cur["error_rate"] == pytest.approx(0.1) and cur["tokens"] == 600 and cur["cost_usd"] == pytest.approx(0.4)
    assert cur["ttft_p95_ms"] == pytest.approx(50.0) and g["gpt-4o-mini"]["current"]["ttft_p95_ms"] is None
    assert 130 <= cur["latency_p95_ms"] <= 140
    assert rep["total"]["current"]["requests"] == 60 and rep["total"]["previous"]["requests"] == 40
    assert rep["error_types"] == [{"error_type": "rate_limited", "count": 3, "previous": 1},
                                  {"error_type": "timeout", "count": 1, "previous": 0}]  # fmt: skip
    assert rep["alerts"] == [{"rule": "success_rate", "severity": "warning", "alerts": 1, "fingerprints": 1}]

    table = cli(config, "report", "--since", "1h", "--until", UNTIL, "--by", "model")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("llmpulse report by model")
    row = next(x for x in lines if x.startswith("gpt-4o "))
    assert " 40 " in row and "+100%" in row and "10.00%" in row and "+5.00pp" in row
    assert "top error types: rate_limited 3 (+200%), timeout 1 (new)" in table.stdout
    assert "alerts fired: success_rate [warning] 1x on 1 series" in table.stdout
    # the shipped success_rate SLO (99% over 30 days, per model): gpt-4o made 5 errors in 60 calls,
    # 1 - (5 / 60) / 1% = -7.33 budgets left; gpt-4o-mini (see calls()) its own
    budgets = {b["group"]: b for b in rep["error_budgets"]}
    assert (budgets["gpt-4o"]["requests"], budgets["gpt-4o"]["errors"]) == (60, 5)
    assert budgets["gpt-4o"]["remaining"] == pytest.approx(1 - (5 / 60) / 0.01)
    assert "error budget left (success_rate: 99% over 30d): gpt-4o -733% (5 errors in 60 calls)" in table.stdout


def test_report_by_key_app_user(config: Path) -> None:
    for by, want in (("key", {"k1": 40, "k2": 20}), ("app", {"search": 40, "bot": 20}),
                     ("user", {"u0": 20, "u1": 20, "u9": 20})):  # fmt: skip
        r = cli(config, "report", "--since", "60m", "--until", UNTIL, "--by", by, "--format", "json")
        assert r.returncode == 0, r.stderr
        assert {x["name"]: x["current"]["requests"] for x in json.loads(r.stdout)["groups"]} == want
    bad = cli(config, "report", "--since", "yesterday")
    assert bad.returncode == 1 and "bad duration" in bad.stderr
