"""/metrics of the dashboard process: Prometheus text that parses, with counters that move as events flow."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

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
    settings = make_settings()
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
