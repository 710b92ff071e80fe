"""gen_ai_* metrics for Prometheus from the worker's windows (llmpulse.sinks.prometheus).

The windows are built by the worker's own accumulator from CallEvents; the exposition is read
back with prometheus-client's parser. The end-to-end test runs the real worker and the real
dashboard against the broker, scrapes the real /metrics after calls flow, re-delivers windows
(same and higher revision) and checks that every metric the Grafana dashboard queries exists.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmpulse.config import Settings, load_settings
from llmpulse.config.loader import ConfigError
from llmpulse.schemas import (
    CallEvent,
    WindowAggregate,
    aggregate_id,
    dimensions_key,
    encode,
    encode_batch,
)
from llmpulse.sinks.prometheus import OTHER, LlmMetrics
from llmpulse.streams.accumulators import CallAccumulator
from tests.kafkatools import produce, read_messages
from tests.pipeline import Component, settings_from, write_config
from tests.test_dashboard_api import Dash

GRAFANA = Path(__file__).resolve().parent.parent / "infra" / "grafana" / "dashboards" / "llmpulse-prometheus.json"
LABELS = ("model", "provider", "app")
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def window(events: list[CallEvent], revision: int = 1, window_s: int = 10, dims: tuple[str, ...] = LABELS) -> WindowAggregate:
    """The calls window the worker would publish for these events (one dimension set)."""
    acc = CallAccumulator()
    for e in events:
        acc.agg(e)
    d = {k: str(getattr(events[0], k)) for k in dims}
    start = int(T0.timestamp() * 1000)
    agg = acc.result(window_s, start, d, dimensions_key(d))
    assert agg.aggregate_id == aggregate_id("calls", window_s, start, dimensions_key(d))
    agg.revision = revision
    return agg


def call(i: int, model: str = "gpt-4o", app: str = "bot", **kw: Any) -> CallEvent:
    base: dict[str, Any] = {"event_id": f"e{i}", "ts": T0 + timedelta(milliseconds=i), "model": model, "provider": "openai",
                            "app": app, "latency_ms": 100.0, "prompt_tokens": 10, "completion_tokens": 3, "cost_usd": 0.001}  # fmt: skip
    base.update(kw)
    return CallEvent(**base)


def parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def exposed(m: LlmMetrics) -> Samples:
    reg = CollectorRegistry()
    reg.register(m)
    return parse(generate_latest(reg).decode())


def series(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


GPT = {"gen_ai_request_model": "gpt-4o", "gen_ai_provider_name": "openai", "service_name": "bot"}


def test_windows_count_once_and_revisions_add_only_their_increase() -> None:
    m = LlmMetrics(LABELS, window_s=10)
    first = [call(i) for i in range(10)] + [call(10, status_code=429, error_type="rate_limited")]
    assert m.apply(window(first))
    assert not m.apply(window(first))  # re-delivered, or re-published after a worker restart
    s = exposed(m)
    assert s[("llmpulse_gen_ai_requests_total", series(GPT))] == 11
    assert s[("llmpulse_gen_ai_errors_total", series({**GPT, "error_type": "rate_limited"}))] == 1
    assert s[("gen_ai_client_token_usage_sum", series({**GPT, "gen_ai_token_type": "input"}))] == 110
    assert s[("gen_ai_client_token_usage_sum", series({**GPT, "gen_ai_token_type": "output"}))] == 33
    assert s[("gen_ai_client_token_usage_count", series({**GPT, "gen_ai_token_type": "input"}))] == 11
    assert s[("llmpulse_gen_ai_cost_usd_total", series(GPT))] == pytest.approx(0.011)
    assert s[("gen_ai_client_operation_duration_seconds_count", series(GPT))] == 11
    assert s[("gen_ai_client_operation_duration_seconds_sum", series(GPT))] == pytest.approx(1.1)

    # backfilled events corrected the window: revision 2 holds all 14 calls, and adds only the 3 new
    backfilled = first + [call(20 + i, ttft_ms=40.0, streamed=True) for i in range(3)]
    assert m.apply(window(backfilled, revision=2))
    assert not m.apply(window(first, revision=1))  # a late copy of the older revision
    s = exposed(m)
    assert s[("llmpulse_gen_ai_requests_total", series(GPT))] == 14
    assert s[("gen_ai_client_operation_time_to_first_chunk_seconds_count", series(GPT))] == 3
    assert s[("gen_ai_client_operation_time_to_first_chunk_seconds_sum", series(GPT))] == pytest.approx(0.12)
    assert s[("gen_ai_client_token_usage_sum", series({**GPT, "gen_ai_token_type": "input"}))] == 140
    assert s[("llmpulse_gen_ai_cost_usd_total", series(GPT))] == pytest.approx(0.014)
    assert m.applied == 2 and m.skipped == 2
    assert s[("llmpulse_gen_ai_window_end_timestamp_seconds", ())] == T0.timestamp() + 10


def test_a_later_revision_of_a_window_never_seen_adds_nothing_until_it_grows() -> None:
    m = LlmMetrics(LABELS, window_s=10)
    events = [call(i) for i in range(5)]
    assert not m.apply(window(events, revision=2))  # revision 1 was counted before this process
    assert ("llmpulse_gen_ai_requests_total", series(GPT)) not in exposed(m)
    assert m.apply(window([*events, call(9)], revision=3))
    assert exposed(m)[("llmpulse_gen_ai_requests_total", series(GPT))] == 1


def test_only_the_label_set_and_the_smallest_window_are_counted() -> None:
    m = LlmMetrics(LABELS, window_s=10)
    events = [call(i) for i in range(4)]
    assert not m.apply(window(events, window_s=60))  # the same calls again, in a larger window
    assert not m.apply(window(events, dims=("model",)))  # another dimension set
    assert m.apply(window(events))
    other = [call(100 + i, model="claude-3-5-sonnet", provider="anthropic", app="search") for i in range(2)]
    assert m.apply(window(other))
    s = exposed(m)
    claude = {"gen_ai_request_model": "claude-3-5-sonnet", "gen_ai_provider_name": "anthropic", "service_name": "search"}
    assert s[("llmpulse_gen_ai_requests_total", series(GPT))] == 4
    assert s[("llmpulse_gen_ai_requests_total", series(claude))] == 2
    assert len([k for k in s if k[0] == "llmpulse_gen_ai_requests_total"]) == 2


def test_duration_buckets_follow_the_calls() -> None:
    m = LlmMetrics(LABELS, window_s=10)
    lat = [5.0, 15.0, 15.0, 300.0, 3000.0, 100_000.0]
    m.apply(window([call(i, latency_ms=v) for i, v in enumerate(lat)]))
    s = exposed(m)

    def le(bound: str) -> float:
        return s[("gen_ai_client_operation_duration_seconds_bucket", series({**GPT, "le": bound}))]

    assert le("0.01") == 1 and le("0.02") == 3 and le("0.32") == 4 and le("5.12") == 5
    assert le("81.92") == 5 and le("+Inf") == 6
    assert s[("gen_ai_client_operation_duration_seconds_sum", series(GPT))] == pytest.approx(sum(lat) / 1000)
    # no streamed call: an empty TTFT histogram, zero everywhere
    assert s[("gen_ai_client_operation_time_to_first_chunk_seconds_count", series(GPT))] == 0


def test_error_types_are_bounded() -> None:
    m = LlmMetrics(LABELS, window_s=10, max_error_types=2)
    evs = [call(i, status_code=500, error_type=f"kind_{i}") for i in range(5)]
    m.apply(window(evs))
    s = exposed(m)
    errs = {dict(k[1])["error_type"]: v for k, v in s.items() if k[0] == "llmpulse_gen_ai_errors_total"}
    assert errs == {"kind_0": 1, "kind_1": 1, OTHER: 3}


def test_label_set_is_validated(tmp_path: Path) -> None:
    bad = tmp_path / "llmpulse.yaml"
    bad.write_text("llm_metrics:\n  labels: [model, region]\n")
    with pytest.raises(ConfigError, match=r"llm_metrics\.labels.*unknown dimension 'region'"):
        load_settings(bad, environ={})
    bad.write_text("llm_metrics:\n  labels: [model, model]\n")
    with pytest.raises(ConfigError, match="listed twice"):
        load_settings(bad, environ={})


def grafana_metric_names() -> set[str]:
    dash = json.loads(GRAFANA.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"]]
    names = set()
    for e in exprs:  # a metric is followed by its selector or range, or is label_values' first argument
        names.update(re.findall(r"\b((?:gen_ai|llmpulse)_\w+)(?=\s*[{\[])", e))
        names.update(re.findall(r"label_values\(\s*(\w+)", e))
    return names


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url + "/metrics", timeout=60) as resp:
        return parse(resp.read().decode())


def total(s: Samples, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in s.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


@pytest.mark.e2e
def test_metrics_move_when_calls_flow_and_grafana_queries_exist(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    config = write_config(tmp_path / "llmpulse.yaml", make_settings(), dashboard__port=0)
    settings = settings_from(config)
    bootstrap = settings.kafka.bootstrap_servers()
    worker = Component(config, "worker", log=tmp_path / "worker.log").start()
    dash = Dash(settings)
    try:
        assert dash.server.llm_metrics is not None and dash.server.llm_metrics.assigned.wait(90)
        now = datetime.now(UTC)
        events = []
        for i in range(120):
            model, provider, app = [("gpt-4o", "openai", "bot"), ("claude-3-5-sonnet", "anthropic", "search")][i % 2]
            err = i % 10 == 0
            events.append(CallEvent(
                event_id=f"p{i}", ts=now + timedelta(milliseconds=10 * i), model=model, provider=provider, app=app,
                status_code=529 if err else 200, error_type="overloaded" if err else None,
                latency_ms=30.0 if i < 40 else 120.0,
                ttft_ms=20.0 if i % 3 == 0 else None, streamed=i % 3 == 0, prompt_tokens=100, completion_tokens=i,
                cost_usd=0.002,
            ))  # fmt: skip
        produce(bootstrap, settings.kafka.topic("calls"),
                [(m, encode_batch([e for e in events if e.model == m])) for m in ("gpt-4o", "claude-3-5-sonnet")])  # fmt: skip

        deadline = time.monotonic() + 120
        s: Samples = {}
        while time.monotonic() < deadline:
            s = scrape(dash.url)
            if total(s, "llmpulse_gen_ai_requests_total") >= len(events):
                break
            time.sleep(0.5)
        assert total(s, "llmpulse_gen_ai_requests_total") == 120, worker.output()[-3000:]
        gpt = {"gen_ai_request_model": "gpt-4o", "gen_ai_provider_name": "openai", "service_name": "bot"}
        assert total(s, "llmpulse_gen_ai_requests_total", **gpt) == 60
        assert total(s, "llmpulse_gen_ai_errors_total", error_type="overloaded") == 12
        assert total(s, "gen_ai_client_token_usage_sum", gen_ai_token_type="input") == 12_000
        assert total(s, "gen_ai_client_token_usage_sum", gen_ai_token_type="output") == sum(range(120))
        assert total(s, "llmpulse_gen_ai_cost_usd_total") == pytest.approx(0.24)
        assert total(s, "gen_ai_client_operation_duration_seconds_count") == 120
        assert total(s, "gen_ai_client_operation_duration_seconds_sum") == pytest.approx((40 * 30 + 80 * 120) / 1000)
        assert total(s, "gen_ai_client_operation_time_to_first_chunk_seconds_count") == 40
        assert total(s, "gen_ai_client_operation_duration_seconds_bucket", le="+Inf", **gpt) == 60
        assert total(s, "gen_ai_client_operation_duration_seconds_bucket", le="0.04", **gpt) == 20  # the 30 ms calls
        assert total(s, "gen_ai_client_operation_duration_seconds_bucket", le="0.08", **gpt) == 20
        assert total(s, "gen_ai_client_operation_duration_seconds_bucket", le="0.16", **gpt) == 60

        # the windows again, as Kafka re-delivers them, and one corrected by a backfill (revision 2, 5 more calls)
        published = [m.value() for m in read_messages(bootstrap, settings.kafka.topic("aggregates"), timeout=30, quiet_s=2.0)]
        ours = [a for a in (WindowAggregate.model_validate_json(v) for v in published)
                if a.kind == "calls" and a.window_s == 2 and sorted(a.dimensions) == sorted(LABELS)]  # fmt: skip
        assert ours and sum(a.requests for a in ours) == 120
        fixed = ours[0].model_copy(update={"revision": ours[0].revision + 1, "requests": ours[0].requests + 5})
        produce(bootstrap, settings.kafka.topic("aggregates"),
                [(a.aggregate_id, encode(a)) for a in ours] + [(fixed.aggregate_id, encode(fixed))])  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and total(s, "llmpulse_gen_ai_requests_total") < 125:
            time.sleep(0.5)
            s = scrape(dash.url)
        time.sleep(2)  # nothing else may arrive: every other copy adds nothing
        s = scrape(dash.url)
        assert total(s, "llmpulse_gen_ai_requests_total") == 125
        assert total(s, "gen_ai_client_operation_duration_seconds_count") == 120  # the copy changed requests only

        # every metric the Grafana dashboard queries is in the real scrape
        names = grafana_metric_names()
        assert {"llmpulse_gen_ai_requests_total", "gen_ai_client_token_usage_sum"} <= names
        scraped = {n for n, _ in s}
        assert names <= scraped, names - scraped
    finally:
        dash.close()
        worker.stop()
    assert "Traceback" not in worker.output(), worker.output()[-3000:]
