"""/metrics of the dashboard process: Prometheus text that parses, with counters that move as events flow;
and every metric an alert rule of infra/prometheus/alerts.yml reads, made to move by a real run or an
injected failure (a metric nobody maintains would be an alert that can never fire)."""

from __future__ import annotations

import contextlib
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from llmpulse.config import Settings
from llmpulse.kafka.clients import producer_settings
from llmpulse.producers.spool import SpoolingPublisher
from llmpulse.schemas import CallEvent
from tests.test_dashboard_api import Dash

# the pipeline's health, as the issue lists it: each family must be exposed
FAMILIES = {
    "llmpulse_events_in": "counter", "llmpulse_events_out": "counter",
    "llmpulse_consumer_lag_messages": "gauge", "llmpulse_window_close_delay_seconds": "histogram",
    "llmpulse_sink_batch_rows": "histogram", "llmpulse_sink_insert_seconds": "histogram",
    "llmpulse_dead_letters": "counter", "llmpulse_proxy_overhead_seconds": "histogram",
    "llmpulse_publish_spool_bytes": "gauge", "llmpulse_publish_dropped": "counter",
    "llmpulse_notifications": "counter",
}  # fmt: skip


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url + "/metrics", timeout=60) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in FAMILIES.items():
        assert name in families and families[name].type == kind, name
    for fam in families.values():
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_parse_and_move(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    settings = make_settings(**{"dashboard.port": 0})  # a free port: 8080 may be taken by another dashboard
    dash = Dash(settings)
    try:
        topic = settings.kafka.topic("calls")
        out_key = ("llmpulse_events_out_total", (("component", "metrics-test"), ("topic", topic)))
        before = scrape(dash.url)
        assert before.get(out_key, 0.0) == 0.0

        pub = SpoolingPublisher(producer_settings(settings.kafka.bootstrap_servers(), settings.kafka),
                                tmp_path / "spool", component="metrics-test")  # fmt: skip
        try:
            for i in range(25):
                pub.publish(topic, CallEvent(event_id=f"m{i}", model="gpt-4o", latency_ms=1.0), key="gpt-4o")
            assert pub.flush(30)
        finally:
            pub.close()

        deadline = time.monotonic() + 30
        after = scrape(dash.url)
        lag = {k: v for k, v in after.items() if k[0] == "llmpulse_consumer_lag_messages"
               and ("component", "sink") in k[1] and ("topic", "calls") in k[1]}  # fmt: skip
        while (after.get(out_key, 0.0) < 25 or not lag or sum(lag.values()) == 0) and time.monotonic() < deadline:
            time.sleep(5.1)  # the lag sampler runs at most every 5 s
            after = scrape(dash.url)
            lag = {k: v for k, v in after.items() if k[0] == "llmpulse_consumer_lag_messages"
                   and ("component", "sink") in k[1] and ("topic", "calls") in k[1]}  # fmt: skip
        assert after[out_key] == 25
        # no sink consumed them: its group is behind on the calls topic
        assert lag and sum(lag.values()) > 0, lag
        spool = ("llmpulse_publish_spool_bytes", (("component", "metrics-test"),))
        assert after[spool] == 0.0
    finally:
        dash.close()


# -- every metric an alert rule reads is maintained: each is made to move ----------------------------

ALERTS = Path(__file__).resolve().parent.parent / "infra" / "prometheus" / "alerts.yml"


def alerted_metrics() -> set[str]:
    """The metric families the rules of infra/prometheus/alerts.yml read (histograms by family)."""
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    names = {n for r in rules for n in re.findall(r"\bllmpulse_[a-z_]+\b", r["expr"])}
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def moves(name: str, labels: dict[str, str], action: Callable[[], None], check: Callable[[], bool] = lambda: True,
          timeout: float = 90.0) -> None:  # fmt: skip
    """Run `action`; the series `name{labels}` of this process must grow (within `timeout`)."""
    before = sample(name, labels)
    action()
    deadline = time.monotonic() + timeout
    while sample(name, labels) <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sample(name, labels) > before, (name, labels)
    assert check()


def scraped(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def _calls_in_kafka(settings: Settings, n: int = 30) -> list[CallEvent]:
    from tests.test_sink import calls, send

    events = calls(n, "mv")
    send(settings, events, per_message=10)
    return events


def _lag(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    from llmpulse.analysis.lag import LagSampler

    settings = make_settings()
    _calls_in_kafka(settings)  # no sink has read them: its group is behind
    labels = [{"component": "sink", "topic": "calls", "partition": str(p)} for p in range(settings.kafka.partitions)]
    LagSampler(settings, min_interval_s=0).sample()
    assert sum(sample("llmpulse_consumer_lag_messages", lb) for lb in labels) > 0


def _sink_run(make_settings: Callable[..., Settings], metric: str, fail: bool) -> None:
    """A real sink (broker, chDB) writes calls; with `fail`, ClickHouse refuses INSERTs for a while."""
    from llmpulse.sinks.clickhouse.sink import ClickHouseSink
    from tests.test_sink import FAST, FlakyClient, figures, running, store_of, wait

    settings = make_settings(**FAST)
    with store_of(settings) as store:
        flaky = FlakyClient(store.client)
        flaky.down = fail
        sink = ClickHouseSink(settings, settings.kafka.bootstrap_servers(), flaky)
        labels = {"component": "sink", "topic": "llm_calls"} if metric == "llmpulse_events_in_total" else {"table": "llm_calls"}
        with running(sink):
            moves(metric, labels, lambda: _calls_in_kafka(settings))
            flaky.down = False
            assert wait(lambda: figures(store.client)[0] == 30)  # and nothing was lost meanwhile


def _window_close(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    from llmpulse.embedded.ports import free_port
    from tests.pipeline import Component, write_config

    settings = make_settings()
    port = free_port()
    config = write_config(tmp_path / "llmpulse.yaml", settings, worker__web_port=port)
    worker = Component(config, "worker", log=tmp_path / "worker.log").start()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                scraped(url, "llmpulse_window_close_delay_seconds_count")
                break
            except OSError:
                time.sleep(0.5)
        _calls_in_kafka(settings)
        while time.monotonic() < deadline and scraped(url, "llmpulse_window_close_delay_seconds_count") == 0:
            time.sleep(1.0)  # windows close once their partition has been idle for idle_close_s
        assert scraped(url, "llmpulse_window_close_delay_seconds_count") > 0, worker.output()[-2000:]
    finally:
        worker.stop()


def _dead_letter(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    from llmpulse.producers.ingest import start_ingest_thread

    settings = make_settings()
    ingest = start_ingest_thread(settings, port=0)
    try:
        def post() -> None:
            req = urllib.request.Request(ingest.url + "/ingest/calls", data=json.dumps([{"model": "m", "latency_ms": -5}]).encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
            with contextlib.suppress(urllib.error.HTTPError):
                urllib.request.urlopen(req, timeout=30).read()

        moves("llmpulse_dead_letters_total", {"component": "ingest", "kind": "invalid"}, post)
    finally:
        ingest.stop()


def _proxy(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    import openai

    from tests.mock_servers import ListPublisher, Servers, upstream_settings
    from tests.test_proxy import API_KEY

    with Servers(lambda url: make_settings(**upstream_settings(url)), publisher=ListPublisher()) as s:
        client = openai.OpenAI(base_url=s.base_url, api_key=API_KEY, max_retries=0)
        moves("llmpulse_proxy_overhead_seconds_count", {},
              lambda: client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]))  # fmt: skip


def _spool(make_settings: Callable[..., Settings], tmp_path: Path, dropped: bool) -> None:
    from llmpulse.embedded.ports import free_port

    settings = make_settings()
    nobody = f"127.0.0.1:{free_port()}"  # no broker answers here: deliveries time out into the spool
    conf = producer_settings(nobody, settings.kafka)
    component = f"mover-{'drop' if dropped else 'spool'}"
    pub = SpoolingPublisher(conf, tmp_path / "spool", component=component, delivery_timeout_s=1.0,
                            spool_max_bytes=1 if dropped else 1 << 30)  # fmt: skip
    try:
        def publish() -> None:
            for i in range(5):
                pub.publish(settings.kafka.topic("calls"), CallEvent(event_id=f"s{i}", model="m", latency_ms=1.0), key="m")

        if dropped:
            moves("llmpulse_publish_dropped_total", {"component": component}, publish, timeout=60)
        else:
            moves("llmpulse_publish_spool_bytes", {"component": component}, publish, timeout=60)
    finally:
        pub.close()


def _notification_failed(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    from tests.fake_slack import FakeSlack
    from tests.test_notify import make_alert, publish, running, slack_webhook_settings

    with FakeSlack() as fake:
        settings, env = slack_webhook_settings(make_settings, fake)
        fake.fail_next(404)  # a webhook that is gone: permanent, not retried
        with running(settings, env):
            moves("llmpulse_notifications_total", {"receiver": "slack", "outcome": "failed"},
                  lambda: publish(settings, [make_alert(rule="metrics-mover")]))  # fmt: skip


MOVERS: dict[str, Callable[[Callable[..., Settings], Path], None]] = {
    "llmpulse_consumer_lag_messages": _lag,
    "llmpulse_events_in_total": lambda ms, tp: _sink_run(ms, "llmpulse_events_in_total", fail=False),
    "llmpulse_window_close_delay_seconds": _window_close,
    "llmpulse_sink_insert_seconds": lambda ms, tp: _sink_run(ms, "llmpulse_sink_insert_seconds_count", fail=False),
    "llmpulse_sink_insert_failures_total": lambda ms, tp: _sink_run(ms, "llmpulse_sink_insert_failures_total", fail=True),
    "llmpulse_dead_letters_total": _dead_letter,
    "llmpulse_proxy_overhead_seconds": _proxy,
    "llmpulse_publish_spool_bytes": lambda ms, tp: _spool(ms, tp, dropped=False),
    "llmpulse_publish_dropped_total": lambda ms, tp: _spool(ms, tp, dropped=True),
    "llmpulse_notifications_total": _notification_failed,
}
"""How each metric an alert reads is made to move: a real run or an injected failure."""


def test_every_metric_an_alert_reads_is_made_to_move_here() -> None:
    assert alerted_metrics() == set(MOVERS)


@pytest.mark.parametrize("metric", sorted(MOVERS))
def test_alerted_metric_moves(metric: str, make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    MOVERS[metric](make_settings, tmp_path)
