"""OTLP/HTTP in: GenAI spans from an app instrumented with the real opentelemetry-sdk and its OTLP
HTTP exporter (protobuf, gzip), and an OTLP JSON request as a collector sends it, through the real
ingest server and broker, into ClickHouse through the real sink. Non-GenAI spans are skipped and
counted, invalid payloads dead-lettered with the reason, a re-sent export counted once."""

from __future__ import annotations

import gzip
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from llmpulse.config import Settings
from llmpulse.producers.ingest import IngestThread, start_ingest_thread
from llmpulse.producers.pricing import price_call
from llmpulse.schemas import CallEvent, DeadLetter, decode
from tests.kafkatools import read_messages
from tests.pipeline import Component, settings_from, wait_for, write_config

MS = 1_000_000  # nanoseconds


def post(url: str, body: bytes, ctype: str, encoding: str | None = None) -> tuple[int, bytes, str]:
    headers = {"Content-Type": ctype}
    if encoding:
        headers["Content-Encoding"] = encoding
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def span_counts(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        s.labels["outcome"]: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "llmpulse_otlp_spans_total"
    }


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def instrumented_app(endpoint: str) -> tuple[list[Any], SpanExportResult]:
    """An app that records its LLM calls as GenAI spans, as OpenLLMetry/OpenLIT do, exporting with gzip."""
    provider = TracerProvider(resource=Resource.create({"service.name": "otel-app"}))
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, compression=Compression.Gzip)))
    tracer = provider.get_tracer("test.instrumentation")
    t0 = time.time_ns() - 60_000 * MS

    s = tracer.start_span("chat gpt-4o", kind=SpanKind.CLIENT, start_time=t0, attributes={
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o", "gen_ai.response.model": "gpt-4o-2024-08-06",
        "gen_ai.usage.input_tokens": 1200, "gen_ai.usage.output_tokens": 300,
        "gen_ai.usage.cache_read.input_tokens": 1000, "gen_ai.request.stream": True, "user.id": "u-42"})  # fmt: skip
    s.add_event("gen_ai.content.chunk", timestamp=t0 + 150 * MS)
    s.add_event("gen_ai.content.chunk", timestamp=t0 + 170 * MS)
    s.end(end_time=t0 + 900 * MS)

    # the older conventions (OpenLLMetry): gen_ai.system, prompt/completion tokens, cache reads counted apart
    s = tracer.start_span("anthropic.chat", kind=SpanKind.CLIENT, start_time=t0 + 1000 * MS, attributes={
        "gen_ai.system": "Anthropic", "llm.request.type": "chat", "gen_ai.request.model": "claude-sonnet-4-5",
        "gen_ai.usage.prompt_tokens": 500, "gen_ai.usage.completion_tokens": 80,
        "gen_ai.usage.cache_read_input_tokens": 2000, "gen_ai.server.time_to_first_token": 0.25,
        "enduser.id": "u-7"})  # fmt: skip
    s.end(end_time=t0 + 2200 * MS)

    s = tracer.start_span("chat o3-mini", kind=SpanKind.CLIENT, start_time=t0 + 3000 * MS, attributes={
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "o3-mini",
        "gen_ai.usage.input_tokens": 40, "gen_ai.usage.output_tokens": 900, "gen_ai.usage.reasoning.output_tokens": 700})  # fmt: skip
    s.end(end_time=t0 + 7000 * MS)

    s = tracer.start_span("chat gpt-4o-mini", kind=SpanKind.CLIENT, start_time=t0 + 8000 * MS, attributes={
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o-mini",
        "error.type": "RateLimitError", "http.response.status_code": 429})  # fmt: skip
    s.set_status(Status(StatusCode.ERROR, "rate limited"))
    s.end(end_time=t0 + 8040 * MS)

    # not model calls: an HTTP server span and an agent span (its usage is its children's)
    tracer.start_span("GET /health", kind=SpanKind.SERVER, start_time=t0, attributes={"http.request.method": "GET"}).end(end_time=t0 + MS)
    tracer.start_span("invoke_agent planner", start_time=t0, attributes={
        "gen_ai.operation.name": "invoke_agent", "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 1200}).end(end_time=t0 + 9000 * MS)  # fmt: skip

    assert provider.force_flush(30_000)
    spans = list(memory.get_finished_spans())
    provider.shutdown()
    # the same batch exported again (an exporter's retry, a collector's duplicate), plain protobuf this time
    again = OTLPSpanExporter(endpoint=endpoint).export(spans)
    return spans, again


def otlp_json_request(t0: int) -> dict[str, Any]:
    """An OTLP/JSON export as a collector or the JS exporter sends it: hex ids, int64s as strings."""
    return {"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "otel-json"}}]},
        "scopeSpans": [{"scope": {"name": "openlit"}, "spans": [{
            "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
            "name": "embeddings text-embedding-3-small", "kind": 3,
            "startTimeUnixNano": str(t0), "endTimeUnixNano": str(t0 + 42 * MS),
            "attributes": [
                {"key": "gen_ai.operation.name", "value": {"stringValue": "embeddings"}},
                {"key": "gen_ai.system", "value": {"stringValue": "openai"}},
                {"key": "gen_ai.request.model", "value": {"stringValue": "text-embedding-3-small"}},
                {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "812"}},
                {"key": "gen_ai.request.user", "value": {"stringValue": "json-user"}},
            ],
            "status": {}}]}]}]}  # fmt: skip


@pytest.fixture
def ingest(make_settings: Callable[..., Settings]) -> Iterator[tuple[Settings, IngestThread]]:
    settings = make_settings(**{"ingest.max_body_bytes": 256 * 1024})
    server = start_ingest_thread(settings, port=0, token="")
    yield settings, server
    server.stop()


@pytest.mark.e2e
def test_genai_spans_from_the_otel_sdk_land_in_clickhouse(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    base = make_settings()
    config = write_config(tmp_path / "llmpulse.yaml", base)
    settings = settings_from(config)
    sink = Component(config, "sink", log=tmp_path / "sink.log").start()
    server = start_ingest_thread(settings, port=0, token="")
    try:
        before = span_counts(server.url)
        spans, again = instrumented_app(server.url + "/v1/traces")
        assert again == SpanExportResult.SUCCESS
        t0 = time.time_ns() - 30_000 * MS
        body = json.dumps(otlp_json_request(t0)).encode()
        status, raw, ctype = post(server.url + "/v1/traces", body, "application/json")
        assert (status, ctype) == (200, "application/json") and json.loads(raw) == {}  # all accepted
        assert post(server.url + "/v1/traces", body, "application/json")[0] == 200  # sent twice

        rows = wait_for(
            settings,
            "SELECT model, provider, response_model, operation, app, user, source, status_code, error_type, "
            "latency_ms, ttft_ms, streamed, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, "
            "toFloat64(cost_usd), event_id, ts "
            "FROM llmpulse.llm_calls FINAL WHERE app IN ('otel-app', 'otel-json') ORDER BY ts",
            lambda r: len(r) >= 5,
        )
        assert [r[0] for r in rows] == ["gpt-4o", "claude-sonnet-4-5", "o3-mini", "gpt-4o-mini", "text-embedding-3-small"]
        by = {r[0]: r for r in rows}
        gpt = by["gpt-4o"]
        assert gpt[1:9] == ["openai", "gpt-4o-2024-08-06", "chat", "otel-app", "u-42", "otlp", 200, ""]
        assert gpt[9] == pytest.approx(900.0) and gpt[10] == pytest.approx(150.0) and gpt[11] is True
        assert gpt[12:16] == [1200, 300, 1000, 0]
        assert gpt[16] == pytest.approx(price_call("gpt-4o", 1200, 300, 1000), abs=1e-9)
        assert gpt[16] == pytest.approx((200 * 2.5 + 1000 * 1.25 + 300 * 10.0) / 1e6, abs=1e-9)
        span = next(s for s in spans if s.name == "chat gpt-4o")
        assert gpt[17] == f"otlp-{span.context.trace_id:032x}-{span.context.span_id:016x}"

        claude = by["claude-sonnet-4-5"]
        assert claude[1] == "anthropic" and claude[3] == "chat" and claude[5] == "u-7"
        assert claude[9] == pytest.approx(1200.0) and claude[10] == pytest.approx(250.0)
        assert claude[12:16] == [2500, 80, 2000, 0]  # cache reads reported apart from input: added back
        assert claude[16] == pytest.approx((500 * 3.0 + 2000 * 0.30 + 80 * 15.0) / 1e6, abs=1e-9)

        o3 = by["o3-mini"]
        assert o3[12:16] == [40, 900, 0, 700] and o3[10] is None and o3[11] is False
        assert o3[16] == pytest.approx(price_call("o3-mini", 40, 900, 0, 700), abs=1e-9)

        err = by["gpt-4o-mini"]
        assert err[7:9] == [429, "RateLimitError"] and err[9] == pytest.approx(40.0) and err[16] is None

        emb = by["text-embedding-3-small"]
        assert emb[1:7] == ["openai", "", "embedding", "otel-json", "json-user", "otlp"]
        assert emb[12] == 812 and emb[9] == pytest.approx(42.0)
        assert emb[16] == pytest.approx(812 * 0.02 / 1e6, abs=1e-12)
        assert emb[17] == "otlp-5b8efff798038103d269b633813fc60c-eee19b7ec3c1b174"

        # every span was sent twice: the figures users read count each once
        totals = wait_for(
            settings,
            "SELECT count(), sum(prompt_tokens), uniqExact(event_id) FROM llmpulse.llm_calls FINAL "
            "WHERE app IN ('otel-app', 'otel-json')",
            lambda r: bool(r),
        )
        assert totals[0] == [5, 1200 + 2500 + 40 + 0 + 812, 5]
        assert delta(before, span_counts(server.url)) == {"accepted": 10, "not_genai": 2, "not_a_model_call": 2}
    finally:
        server.stop()
        sink.stop()


def test_invalid_payloads_are_dead_lettered_and_invalid_spans_partially_rejected(
    ingest: tuple[Settings, IngestThread],
) -> None:
    settings, server = ingest
    url = server.url + "/v1/traces"
    before = span_counts(server.url)

    # not a protobuf export at all: 400 with a google.rpc.Status in protobuf
    from google.rpc.status_pb2 import Status as RpcStatus

    status, raw, ctype = post(url, b"\x0a\xff\xff\xff\x0fgarbage", "application/x-protobuf")
    assert (status, ctype) == (400, "application/x-protobuf")
    st = RpcStatus.FromString(raw)
    assert st.code == 3 and st.message.startswith("not an OTLP protobuf ExportTraceServiceRequest")

    bad_json = [
        (b"{nope", "invalid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON nested deeper than 64 levels"),
        (json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz" * 16, "spanId": "00" * 8}]}]}]}).encode(),
         "resourceSpans[0].scopeSpans[0].spans[0].traceId: expected 32 hex digits"),
        (json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [{"startTimeUnixNano": "soon"}]}]}]}).encode(),
         "not an OTLP JSON ExportTraceServiceRequest"),
        (b"[1, 2]", "an OTLP JSON export must be a JSON object"),
    ]  # fmt: skip
    for body, reason in bad_json:
        status, raw, ctype = post(url, body, "application/json")
        assert (status, ctype) == (400, "application/json"), body[:80]
        got = json.loads(raw)
        assert got["code"] == 3 and got["message"].startswith(reason), got
    # the same deep body gzipped (the exporter's default encoding) is still a 400 with the reason
    status, raw, _ = post(url, gzip.compress(bad_json[1][0]), "application/json", encoding="gzip")
    assert status == 400 and json.loads(raw)["message"] == "JSON nested deeper than 64 levels"
    # a gzip bomb is bounded by ingest.max_body_bytes after decompression
    status, raw, _ = post(url, gzip.compress(b" " * (2 * 1024 * 1024)), "application/json", encoding="gzip")
    assert status == 413 and "larger than 262144 bytes" in json.loads(raw)["message"]
    status, raw, _ = post(url, b"{}", "text/plain")
    assert status == 415 and "application/x-protobuf" in json.loads(raw)["message"]

    # a valid export with one invalid GenAI span: 200 with partial_success, the good span counts
    t0 = time.time_ns()
    req = otlp_json_request(t0)
    good = req["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    bad = {**good, "spanId": "00000000000000ab", "name": "chat broken",
           "attributes": [*good["attributes"][:3], {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "-5"}}]}  # fmt: skip
    req["resourceSpans"][0]["scopeSpans"][0]["spans"].append(bad)
    status, raw, ctype = post(url, json.dumps(req).encode(), "application/json")
    assert status == 200
    partial = json.loads(raw)["partialSuccess"]
    assert partial["rejectedSpans"] == "1"  # int64 as a string, as OTLP JSON encodes it
    assert "1 of 2 spans rejected" in partial["errorMessage"]
    assert "'gen_ai.usage.input_tokens': expected a non-negative integer, got -5" in partial["errorMessage"]

    # the same in protobuf, encoded by the SDK's own OTLP encoder: the response is protobuf too
    provider = TracerProvider(resource=Resource.create({"service.name": "otel-pb"}))
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("test")
    tracer.start_span("chat ok", attributes={"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 3}).end()
    tracer.start_span("chat no model", attributes={"gen_ai.operation.name": "chat"}).end()
    status, raw, ctype = post(url, encode_spans(memory.get_finished_spans()).SerializeToString(), "application/x-protobuf")
    assert (status, ctype) == (200, "application/x-protobuf")
    resp = ExportTraceServiceResponse.FromString(raw)
    assert resp.partial_success.rejected_spans == 1
    assert "span 'chat no model': attribute 'gen_ai.request.model': missing" in resp.partial_success.error_message

    dead = [
        d for m in read_messages(settings.kafka.bootstrap_servers(), settings.kafka.topic("deadletter"), expect=9, quiet_s=1.0, timeout=60)
        for d in decode(m.value(), DeadLetter).valid
    ]  # fmt: skip
    # 413 and 415 are not dead-lettered: the body was not read, or not meant as a trace export
    assert len(dead) == 9 and all(d.source == "ingest /v1/traces" for d in dead)
    by_body = {d.original_bytes(): d for d in dead}
    assert by_body[b"\x0a\xff\xff\xff\x0fgarbage"].payload_encoding == "base64"
    for body, reason in bad_json:
        assert by_body[body].reason.startswith(reason)
    assert sum(d.original_bytes() == bad_json[1][0] for d in dead) == 2  # the gzipped one kept decompressed
    # the rejected span's dead letter is itself an OTLP JSON request, with its resource, that can be re-posted
    (span_letter,) = [d for d in dead if d.reason.startswith("span 'chat broken'")]
    assert span_letter.reason.startswith("span 'chat broken': attribute 'gen_ai.usage.input_tokens'")
    resent = json.loads(span_letter.original_bytes())
    assert resent["resourceSpans"][0]["resource"]["attributes"][0]["value"] == {"stringValue": "otel-json"}
    assert resent["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["spanId"] == "00000000000000ab"

    calls = [
        e for m in read_messages(settings.kafka.bootstrap_servers(), settings.kafka.topic("calls"), expect=2, quiet_s=1.0, timeout=60)
        for e in decode(m.value(), CallEvent).valid
    ]  # fmt: skip
    assert sorted((c.app, c.source, c.prompt_tokens) for c in calls) == [("otel-json", "otlp", 812), ("otel-pb", "otlp", 3)]
    assert "otlp-5b8efff798038103d269b633813fc60c-eee19b7ec3c1b174" in {c.event_id for c in calls}
    assert delta(before, span_counts(server.url)) == {"accepted": 2, "rejected": 2}


def _span(span_id: str, name: str, attrs: dict[str, Any], t0: int, dur_ms: int = 10, **extra: Any) -> dict[str, Any]:
    def value(v: Any) -> dict[str, Any]:
        if isinstance(v, bool):
            return {"boolValue": v}
        if isinstance(v, int):
            return {"intValue": str(v)}
        if isinstance(v, float):
            return {"doubleValue": v}
        return {"stringValue": v}

    return {"traceId": "0af7651916cd43dd8448eb211c80319c", "spanId": span_id, "name": name,
            "startTimeUnixNano": str(t0), "endTimeUnixNano": str(t0 + dur_ms * MS),
            "attributes": [{"key": k, "value": value(v)} for k, v in attrs.items()], **extra}  # fmt: skip


def test_mapping_edge_cases_through_the_server(ingest: tuple[Settings, IngestThread]) -> None:
    settings, server = ingest
    t0 = time.time_ns()
    spans = [
        _span("00000000000000a1", "completion", {"gen_ai.operation.name": "text_completion", "gen_ai.request.model": "gpt-3.5-turbo-instruct",
              "gen_ai.usage.input_tokens": "12", "gen_ai.usage.output_tokens": 3.0}, t0),  # numbers sent as a string and a double
        _span("00000000000000a2", "rerank", {"gen_ai.operation.name": "rerank", "gen_ai.system": "cohere", "gen_ai.request.model": "rerank-v3"}, t0),
        _span("00000000000000a3", "failed", {"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 5}, t0,
              status={"code": 2, "message": "connection reset"}),
        _span("00000000000000a4", "ttft event", {"gen_ai.request.model": "gpt-4o"}, t0, dur_ms=500,
              events=[{"name": "gen_ai.first_token", "timeUnixNano": str(t0 + 120 * MS)}]),
        _span("00000000000000b1", "bad ttft", {"gen_ai.request.model": "gpt-4o", "gen_ai.server.time_to_first_token": -1.0}, t0),
        _span("00000000000000b2", "bad model type", {"gen_ai.request.model": 42}, t0),
        _span("00000000000000b3", "backwards", {"gen_ai.request.model": "gpt-4o"}, t0, dur_ms=-5),
        _span("00000000000000b4", "unknown model", {"gen_ai.request.model": "my-finetune", "gen_ai.usage.input_tokens": 7}, t0),
    ]  # fmt: skip
    req = {"resourceSpans": [
        {"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "edge-app"}},
                                     {"key": "enduser.id", "value": {"stringValue": "resource-user"}}]},
         "scopeSpans": [{"spans": spans}]},
        {"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "s" * 200}}]},
         "scopeSpans": [{"spans": [_span("00000000000000b5", "long app", {"gen_ai.request.model": "gpt-4o"}, t0)]}]},
    ]}  # fmt: skip
    status, raw, _ = post(server.url + "/v1/traces", json.dumps(req).encode(), "application/json")
    assert status == 200
    partial = json.loads(raw)["partialSuccess"]
    assert partial["rejectedSpans"] == "4"

    calls = {
        e.event_id[-2:]: e
        for m in read_messages(settings.kafka.bootstrap_servers(), settings.kafka.topic("calls"), expect=1, until=lambda ms: sum(len(decode(m.value(), CallEvent).valid) for m in ms) >= 5, quiet_s=1.0, timeout=60)
        for e in decode(m.value(), CallEvent).valid
    }  # fmt: skip
    assert sorted(calls) == ["a1", "a2", "a3", "a4", "b4"]
    a1, a2, a3, a4, b4 = (calls[k] for k in ("a1", "a2", "a3", "a4", "b4"))
    assert (a1.operation, a1.prompt_tokens, a1.completion_tokens, a1.provider) == ("completion", 12, 3, "unknown")
    assert a1.cost_usd == pytest.approx(price_call("gpt-3.5-turbo-instruct", 12, 3), abs=1e-12)
    assert (a2.operation, a2.provider, a2.cost_usd) == ("other", "cohere", None)  # no usage: no cost
    assert (a3.status_code, a3.error_type, a3.is_error) == (0, "span_error", True)
    assert a4.ttft_ms == pytest.approx(120.0) and a4.streamed and a4.latency_ms == pytest.approx(500.0)
    assert b4.cost_usd is None and b4.prompt_tokens == 7  # a model without a price: no guess
    assert all(c.app == "edge-app" and c.user == "resource-user" for c in calls.values())

    reasons = {
        d.reason.split(":")[0]: d.reason
        for m in read_messages(settings.kafka.bootstrap_servers(), settings.kafka.topic("deadletter"), expect=4, quiet_s=1.0, timeout=60)
        for d in decode(m.value(), DeadLetter).valid
    }  # fmt: skip
    assert "expected seconds (a non-negative number), got -1.0" in reasons["span 'bad ttft'"]
    assert "attribute 'gen_ai.request.model': expected a string, got int 42" in reasons["span 'bad model type'"]
    assert "end_time_unix_nano: before its start" in reasons["span 'backwards'"]
    assert "field 'app' (from resource attribute 'service.name'): String should have at most 128 characters" in reasons["span 'long app'"]
