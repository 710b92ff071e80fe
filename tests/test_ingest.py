"""HTTP ingest against the real broker: mixed batches, dead letters, feedback, token, size bound."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from llmpulse.config import Settings
from llmpulse.producers.ingest import IngestThread, start_ingest_thread
from llmpulse.producers.retry_stamps import RetryStamps
from llmpulse.schemas import CallEvent, DeadLetter, Feedback, decode
from tests.kafkatools import read_messages


def post(url: str, body: bytes, ctype: str = "application/json", token: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": ctype}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.fixture
def ingest(make_settings: Callable[..., Settings]) -> Iterator[tuple[Settings, IngestThread]]:
    settings = make_settings(**{"ingest.max_body_bytes": 64 * 1024})
    server = start_ingest_thread(settings, port=0, token="")
    yield settings, server
    server.stop()


def _events(msgs: list[Any], model: type[Any]) -> list[Any]:
    out = []
    for m in msgs:
        d = decode(m.value(), model)
        assert not d.rejected, d.rejected
        out.extend(d.valid)
    return out


def test_mixed_batch_counts_valid_exactly_and_dead_letters_the_rest(ingest: tuple[Settings, IngestThread]) -> None:
    settings, server = ingest
    bootstrap = settings.kafka.bootstrap_servers()
    valid = [
        {"event_id": "ing-1", "model": "gpt-4o-mini", "provider": "openai", "prompt_tokens": 10, "completion_tokens": 5, "latency_ms": 120.5},
        {"event_id": "ing-2", "model": "gpt-4o-mini", "source": "proxy", "status_code": 500, "error_type": "server_error"},
        {"event_id": "ing-3", "model": "claude-3-5-haiku", "provider": "anthropic", "app": "billing", "ts": "2025-01-02T03:04:05Z"},
    ]
    batch = [
        valid[0],
        {"event_id": "bad-1", "model": "gpt-4o", "latency_ms": "fast"},  # wrong type
        valid[1],
        {"event_id": "bad-2", "model": "gpt-4o", "colour": "blue"},  # unknown field
        "not an event",  # not an object
        {"event_id": "bad-3", "prompt_tokens": 3},  # required field missing
        valid[2],
    ]
    status, body = post(server.url + "/ingest/calls", json.dumps({"events": batch}).encode())
    assert status == 207, body
    assert body["accepted"] == 3 and body["rejected"] == 4
    statuses = [r["status"] for r in body["results"]]
    assert statuses == ["accepted", "rejected", "accepted", "rejected", "rejected", "rejected", "accepted"]
    assert "latency_ms" in body["results"][1]["error"]
    assert "colour" in body["results"][3]["error"] and "unknown field" in body["results"][3]["error"]
    assert "JSON object" in body["results"][4]["error"]
    assert "'model'" in body["results"][5]["error"] and "missing" in body["results"][5]["error"]

    # NDJSON: a line that is not JSON at all is one rejected item, the others still count
    nd = b"\n".join([json.dumps({"event_id": "ing-4", "model": "gpt-4o"}).encode(), b'{"model": "gpt-4o", ', b""])
    status, body = post(server.url + "/ingest/calls", nd, ctype="application/x-ndjson")
    assert status == 207, body
    assert [r["status"] for r in body["results"]] == ["accepted", "rejected"]
    assert body["results"][1]["error"].startswith("invalid JSON")

    # a body that is not JSON at all: 400, and the whole body is dead-lettered
    status, body = post(server.url + "/ingest/calls", b"{nope")
    assert status == 400 and body["error"].startswith("invalid JSON")
    # one invalid event alone: 400 naming the field
    status, body = post(server.url + "/ingest/calls", json.dumps({"model": "m", "status_code": "x"}).encode())
    assert status == 400 and "status_code" in body["error"]

    calls = read_messages(
        bootstrap, settings.kafka.topic("calls"),
        until=lambda ms: len(_events(ms, CallEvent)) >= 4, quiet_s=1.5, timeout=60,
    )
    events = _events(calls, CallEvent)
    assert sorted(e.event_id for e in events) == ["ing-1", "ing-2", "ing-3", "ing-4"]
    assert all(e.source == "ingest" for e in events)
    by_id = {e.event_id: e for e in events}
    assert by_id["ing-1"].total_tokens == 15 and by_id["ing-1"].latency_ms == 120.5
    assert by_id["ing-2"].is_error and by_id["ing-3"].app == "billing"
    for m in calls:  # keyed by model
        assert {e.model for e in _events([m], CallEvent)} == {m.key().decode()}

    dead = _events(
        read_messages(bootstrap, settings.kafka.topic("deadletter"), expect=7, quiet_s=1.0, timeout=60),
        DeadLetter,
    )
    assert len(dead) == 7
    reasons = [d.reason for d in dead]
    assert any("latency_ms" in r for r in reasons)
    assert any("colour" in r for r in reasons)
    assert any(r.startswith("invalid JSON") and d.original_bytes() == b'{"model": "gpt-4o", ' for r, d in zip(reasons, dead, strict=True))
    assert any(d.original_bytes() == b"{nope" for d in dead)
    assert any(d.original_bytes() == b'"not an event"' for d in dead)
    assert all(d.source.startswith("ingest /ingest/calls") for d in dead)


def test_feedback_health_metrics_and_size_bound(ingest: tuple[Settings, IngestThread]) -> None:
    settings, server = ingest
    bootstrap = settings.kafka.bootstrap_servers()
    fb = [
        {"call_event_id": "ing-1", "intent_correct": True, "relevance": 4.5},
        {"call_event_id": "ing-2", "relevance": 7},
        {"call_event_id": "ing-3"},
    ]
    status, body = post(server.url + "/ingest/feedback", json.dumps(fb).encode())
    assert status == 207, body
    assert [r["status"] for r in body["results"]] == ["accepted", "rejected", "rejected"]
    assert "relevance" in body["results"][1]["error"]
    assert "intent_correct or relevance" in body["results"][2]["error"]
    got = _events(read_messages(bootstrap, settings.kafka.topic("feedback"), expect=1, timeout=60), Feedback)
    assert [(f.call_event_id, f.relevance) for f in got] == [("ing-1", 4.5)]

    big = json.dumps([{"model": "x" * 200}] * 400).encode()
    assert len(big) > 64 * 1024
    status, body = post(server.url + "/ingest/calls", big)
    assert status == 413 and "larger than" in body["error"]

    with urllib.request.urlopen(server.url + "/healthz", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok"}
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'llmpulse_events_in_total{component="ingest",topic="/ingest/feedback"}' in text


def test_bearer_token_required_when_configured(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    server = start_ingest_thread(settings, port=0, token="s3cret-token")
    try:
        one = json.dumps({"model": "gpt-4o"}).encode()
        assert post(server.url + "/ingest/calls", one)[0] == 401
        assert post(server.url + "/ingest/calls", one, token="wrong")[0] == 401
        status, body = post(server.url + "/ingest/calls", one, token="s3cret-token")
        assert status == 202 and body["accepted"] == 1
    finally:
        server.stop()


def test_deeply_nested_json_is_a_400_with_a_reason_on_every_input(make_settings: Callable[..., Settings]) -> None:
    """200 KB of nested arrays used to raise RecursionError inside the parser: HTTP 500."""
    settings = make_settings(**{"ingest.max_body_bytes": 1024 * 1024})
    server = start_ingest_thread(settings, port=0, token="")
    try:
        deep = b"[" * 100_000 + b"]" * 100_000
        nested_field = json.dumps({"model": "gpt-4o"})[:-1].encode() + b', "user": ' + b"[" * 200 + b"]" * 200 + b"}"
        for path in ("/ingest/calls", "/ingest/feedback"):
            status, body = post(server.url + path, deep)
            assert status == 400, (path, status, body)
            assert body["error"] == "JSON nested deeper than 64 levels"
            status, body = post(server.url + path, deep, ctype="application/x-ndjson")
            assert status == 400 and body["results"][0]["error"] == "JSON nested deeper than 64 levels"
        # deep inside one event of a batch: that event is rejected and named, the other one counts
        batch = b"[" + json.dumps({"event_id": "deep-ok", "model": "gpt-4o"}).encode() + b"," + nested_field + b"]"
        status, body = post(server.url + "/ingest/calls", batch)
        assert status == 400 and "nested deeper than 64 levels (at '1.user.0.0.0.0.0.0...')" in body["error"]
        status, body = post(server.url + "/ingest/calls", b"\n".join([json.dumps({"event_id": "deep-ok", "model": "gpt-4o"}).encode(), nested_field]), ctype="application/x-ndjson")
        assert status == 207 and [r["status"] for r in body["results"]] == ["accepted", "rejected"]
        assert body["results"][1]["error"] == "JSON nested deeper than 64 levels (at 'user.0.0.0.0.0.0.0...')"
        with urllib.request.urlopen(server.url + "/healthz", timeout=10) as r:  # still serving
            assert r.status == 200
        dead = _events(
            read_messages(settings.kafka.bootstrap_servers(), settings.kafka.topic("deadletter"), expect=6, quiet_s=1.0, timeout=60),
            DeadLetter,
        )
        assert sum(d.original_bytes() == deep for d in dead) == 4
        assert all("nested deeper than 64 levels" in d.reason for d in dead)
    finally:
        server.stop()


def test_a_retried_event_without_ts_keeps_the_ts_of_its_first_arrival(ingest: tuple[Settings, IngestThread]) -> None:
    """A client retrying its batch (same event ids, no ts) sends the same events, not new ones:
    llm_calls is keyed by (.., ts, event_id) and the worker dedups by id within ts's window."""
    settings, server = ingest
    batch = json.dumps([{"event_id": f"retry-{i}", "model": "gpt-4o"} for i in range(3)]).encode()
    assert post(server.url + "/ingest/calls", batch)[0] == 202
    time.sleep(1.1)  # a second later: a fresh stamp would differ
    assert post(server.url + "/ingest/calls", batch)[0] == 202
    fresh = json.dumps({"event_id": "retry-new", "model": "gpt-4o"}).encode()
    assert post(server.url + "/ingest/calls", fresh)[0] == 202
    events = _events(
        read_messages(
            settings.kafka.bootstrap_servers(), settings.kafka.topic("calls"),
            until=lambda ms: len(_events(ms, CallEvent)) >= 7, quiet_s=1.0, timeout=60,
        ),
        CallEvent,
    )
    stamps: dict[str, set[Any]] = {}
    for e in events:
        stamps.setdefault(e.event_id, set()).add(e.ts)
    assert sorted(stamps) == ["retry-0", "retry-1", "retry-2", "retry-new"]
    assert all(len(ts) == 1 for ts in stamps.values()), stamps
    assert next(iter(stamps["retry-new"])) > next(iter(stamps["retry-0"]))


def test_retry_stamps_are_bounded_by_age_and_count() -> None:
    now = [1_000.0]
    stamps = RetryStamps(horizon_s=60, max_ids=2, clock=lambda: now[0])
    first = stamps.stamp("a")
    now[0] += 30
    assert stamps.stamp("a") == first  # a retry within the horizon: same ts
    assert stamps.stamp("b").timestamp() == 1_030.0
    now[0] += 31  # "a" is now 61 s old: forgotten, a late copy is stamped anew
    assert stamps.stamp("a").timestamp() == 1_061.0
    assert len(stamps) == 2
    stamps.stamp("c")  # over max_ids: the oldest ("b") goes
    assert len(stamps) == 2 and stamps.stamp("b").timestamp() == 1_061.0
