"""infra/grafana and infra/prometheus load, and every query they hold runs against the real schema.

Each Grafana panel query (and variable query), with the plugin's macros and the dashboard's
variables expanded, runs read-only on a chDB store migrated by llmpulse.sinks.clickhouse.migrate:
a table or column that does not exist fails the test. Prometheus rules may name only
metrics that llmpulse/metrics.py defines.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import llmpulse.metrics  # noqa: F401 - registers the pipeline metrics
from llmpulse.analysis.readonly import run_readonly
from llmpulse.config import load_settings
from llmpulse.embedded.store import Store, open_store
from llmpulse.sinks.clickhouse.migrate import migrate

INFRA = Path(__file__).resolve().parent.parent / "infra"
DASHBOARD = INFRA / "grafana" / "dashboards" / "llmpulse.json"
DATASOURCE = INFRA / "grafana" / "provisioning" / "datasources" / "clickhouse.yaml"
PROVIDER = INFRA / "grafana" / "provisioning" / "dashboards" / "llmpulse.yaml"
ALERTS = INFRA / "prometheus" / "alerts.yml"


def expand(sql: str, variables: dict[str, str]) -> str:
    """The grafana-clickhouse-datasource macros and the dashboard's variables, as Grafana expands them."""
    sql = re.sub(r"\$__timeFilter\((\w+)\)",
                 r"\1 >= toDateTime(now() - INTERVAL 6 HOUR) AND \1 <= toDateTime(now())", sql)  # fmt: skip
    sql = re.sub(r"\$__timeInterval\((\w+)\)", r"toStartOfInterval(toDateTime(\1), INTERVAL 60 second)", sql)
    sql = sql.replace("$__interval_s", "60")
    for name, value in variables.items():
        sql = sql.replace("${" + name + "}", value).replace("$" + name, value)
    assert "$" not in sql, f"unexpanded macro or variable in: {sql}"
    return sql


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    settings = load_settings(None, environ={}, overrides={"data_dir": str(tmp_path_factory.mktemp("grafana"))})
    s = open_store(settings.clickhouse, settings.data_dir, {"role": "test"})
    migrate(s.client, settings.clickhouse)
    yield s
    s.close()


def test_provisioning_files() -> None:
    ds = yaml.safe_load(DATASOURCE.read_text())
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "grafana-clickhouse-datasource" and source["uid"] == "llmpulse-clickhouse"
    assert source["jsonData"]["defaultDatabase"] == "llmpulse"
    assert "password" not in source["jsonData"] and source["secureJsonData"]["password"].startswith("${")
    prov = yaml.safe_load(PROVIDER.read_text())
    (p,) = prov["providers"]
    assert p["type"] == "file" and p["options"]["path"]


def test_dashboard_structure() -> None:
    dash = json.loads(DASHBOARD.read_text())
    for key in ("uid", "title", "panels", "templating", "time", "schemaVersion"):
        assert key in dash, key
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for what in ("requests per second", "error rate", "latency p95", "first token", "tokens", "cost",
                 "gpu utilisation", "gpu memory", "gpu temperature", "alerts", "calls"):  # fmt: skip
        assert what in titles, what
    for p in dash["panels"]:
        assert p["type"] in ("timeseries", "table")
        assert set(p["gridPos"]) == {"x", "y", "w", "h"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        assert p["datasource"]["uid"] == "llmpulse-clickhouse" and p["targets"]
        for t in p["targets"]:
            assert t["refId"] and t["rawSql"] and t["datasource"]["uid"] == "llmpulse-clickhouse"
    names = {v["name"] for v in dash["templating"]["list"]}
    assert names == {"model", "app", "user", "status", "error_type"}


def _queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    out = [(p["title"], t["rawSql"]) for p in dash["panels"] for t in p["targets"]]
    out += [(f"variable {v['name']}", v["query"]) for v in dash["templating"]["list"]]
    return out


@pytest.mark.parametrize("values", ["__all", "gpt-4o"])
def test_every_query_runs_on_the_migrated_schema(store: Store, values: str) -> None:
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: values for v in dash["templating"]["list"]}
    queries = _queries(dash)
    assert len(queries) == len(dash["panels"]) + len(variables)
    referenced = set()
    for title, sql in queries:
        expanded = expand(sql, variables)
        referenced.update(re.findall(r"llmpulse\.(\w+)", expanded))
        res = run_readonly(store.client, expanded, "llmpulse", 1000, 10.0)  # unknown tables/columns raise
        assert isinstance(res.columns, list), title
    tables = {r[0] for r in store.client.query("SHOW TABLES FROM llmpulse").result_rows}
    assert referenced <= tables and {"llm_calls", "llm_aggregates", "gpu_samples", "alerts"} <= referenced


def test_expand_catches_a_missing_column(store: Store) -> None:
    # the check above would notice a query that names a column the schema lacks
    from llmpulse.errors import LLMPulseError

    with pytest.raises(LLMPulseError, match="query failed"):
        run_readonly(store.client, expand("SELECT no_such_column FROM llmpulse.llm_calls WHERE $__timeFilter(ts)", {}),
                     "llmpulse", 10, 10.0)  # fmt: skip


def test_prometheus_alert_rules() -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    known: set[str] = set()
    for fam in REGISTRY.collect():
        if fam.name.startswith("llmpulse_"):
            known.add(fam.name)
            known.update(s.name for s in fam.samples)
            known.update(fam.name + suffix for suffix in ("_total", "_bucket", "_sum", "_count", "_created"))
    names = []
    for group in rules["groups"]:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}
            assert r["alert"] and r["expr"] and r["labels"]["severity"] in ("warning", "critical")
            assert r["annotations"]["summary"]
            if "for" in r:
                assert re.fullmatch(r"\d+[smh]", r["for"])
            used = set(re.findall(r"\bllmpulse_\w+", r["expr"]))
            assert used and used <= known, used - known
            assert r["expr"].count("(") == r["expr"].count(")")
            names.append(r["alert"])
    assert len(names) == len(set(names))
    covered = " ".join(r["expr"] for g in rules["groups"] for r in g["rules"])
    for metric in ("consumer_lag", "events_in", "window_close_delay", "sink_insert_seconds", "dead_letters",
                   "proxy_overhead", "publish_spool_bytes", "publish_dropped", "notifications"):  # fmt: skip
        assert f"llmpulse_{metric}" in covered, metric


PROM_DASHBOARD = INFRA / "grafana" / "dashboards" / "llmpulse-prometheus.json"
PROM_DATASOURCE = INFRA / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"


def test_prometheus_dashboard_uses_the_exposed_gen_ai_metrics() -> None:
    """The Prometheus dashboard's PromQL names only families LlmMetrics exposes (the real scrape
    is checked end to end in tests/test_llm_metrics.py), and its provisioning is consistent."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from llmpulse.sinks.prometheus import LlmMetrics
    from tests.test_llm_metrics import call, grafana_metric_names, window

    (source,) = yaml.safe_load(PROM_DATASOURCE.read_text())["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "llmpulse-prometheus" and source["url"].startswith("http")
    dash = json.loads(PROM_DASHBOARD.read_text())
    assert dash["uid"] != json.loads(DASHBOARD.read_text())["uid"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["type"] in ("timeseries", "table") and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        assert p["datasource"]["uid"] == "llmpulse-prometheus" and p["targets"]
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")") and t["datasource"]["uid"] == "llmpulse-prometheus"
            used = set(re.findall(r'(\w+)=~"\$(\w+)"', t["expr"]))
            assert used == {("gen_ai_request_model", "model"), ("gen_ai_provider_name", "provider"), ("service_name", "app")}
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for what in ("requests", "error rate", "duration p95", "first chunk", "tokens", "cost"):
        assert what in titles, what
    m = LlmMetrics(("model", "provider", "app"), window_s=10)
    m.apply(window([call(1, status_code=500, error_type="server_error", ttft_ms=5.0), call(2)]))
    reg = CollectorRegistry()
    reg.register(m)
    exposed = {s.name for f in text_string_to_metric_families(generate_latest(reg).decode()) for s in f.samples}
    names = grafana_metric_names()
    assert len(names) >= 6 and names <= exposed, names - exposed
