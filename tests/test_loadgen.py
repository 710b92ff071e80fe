"""Demo traffic: each incident of a shortened schedule is present in the produced events as designed."""

from __future__ import annotations

import asyncio
import statistics
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from llmpulse.config import Settings
from llmpulse.producers.keyhash import KeyHasher, load_secret
from llmpulse.producers.loadgen import (
    HOT_KEY,
    Incident,
    LoadGenerator,
    Schedule,
    daily_rhythm,
    default_schedule,
)
from llmpulse.producers.mock_upstream import MockUpstream, start_mock_upstream
from llmpulse.schemas import CallEvent, GpuSample, decode
from tests.kafkatools import read_messages


def all_events(settings: Settings, topic: str, model: type, n: int, quiet_s: float = 1.0) -> list:  # type: ignore[type-arg]
    def count(ms: list) -> int:  # type: ignore[type-arg]
        return sum(len(decode(m.value(), model).valid) for m in ms)

    msgs = read_messages(settings.kafka.bootstrap_servers(), settings.kafka.topic(topic),
                         until=lambda ms: count(ms) >= n, quiet_s=quiet_s, timeout=90)
    return [e for m in msgs for e in decode(m.value(), model).valid]


def test_shortened_schedule_produces_each_incident(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(**{"gpu.simulate_gpus": 2})
    schedule = default_schedule(0.2)  # 108 s of traffic, each incident 12 s
    start = datetime(2025, 3, 4, 14, 0, tzinfo=UTC)
    gen = LoadGenerator(settings, schedule, rate_per_s=8, seed=3, realtime=False, rhythm=None, gpu_interval_s=1.0)
    stats = gen.run_fast(start=start)
    assert stats.calls > 700 and stats.gpu_samples == 2 * 108

    calls: list[CallEvent] = all_events(settings, "calls", CallEvent, stats.calls)
    assert len(calls) == stats.calls
    assert len({e.event_id for e in calls}) == stats.calls
    assert len({e.app for e in calls}) == 4 and len({e.model for e in calls}) == 8
    assert {e.provider for e in calls} >= {"openai", "anthropic", "google", "self-hosted"}
    assert len({e.user for e in calls}) > 40 and {e.operation for e in calls} == {"chat", "completion", "embedding"}
    assert {e.streamed for e in calls} == {True, False}
    assert all(e.api_key_hash and e.api_key_hash.startswith("hk_") for e in calls)
    assert all(e.cost_usd is not None for e in calls)

    def window(kind: str) -> tuple[datetime, datetime]:
        inc = schedule.first(kind)  # type: ignore[arg-type]
        return start + timedelta(seconds=inc.start_s), start + timedelta(seconds=inc.end_s)

    def split(kind: str, pred: Callable[[CallEvent], bool]) -> tuple[list[CallEvent], list[CallEvent]]:
        a, b = window(kind)
        inside = [e for e in calls if pred(e) and a <= e.ts < b]
        outside = [e for e in calls if pred(e) and not a <= e.ts < b]
        return inside, outside

    # error burst: half of gpt-4o-mini fails, errors elsewhere stay rare
    inside, outside = split("error_burst", lambda e: e.model == "gpt-4o-mini")
    rate_in = sum(e.is_error for e in inside) / len(inside)
    assert len(inside) >= 15 and rate_in >= 0.3, (len(inside), rate_in)
    others = [e for e in calls if e not in inside]
    assert sum(e.is_error for e in others) / len(others) < 0.03
    assert {e.status_code for e in inside if e.is_error} <= {500, 429}

    # latency spike: claude-3-5-sonnet several times slower
    inside, outside = split("latency_spike", lambda e: e.model == "claude-3-5-sonnet" and not e.is_error)
    assert len(inside) >= 8
    assert statistics.median(e.latency_ms for e in inside) > 4 * statistics.median(e.latency_ms for e in outside)

    # token spike: app summarizer uses far more tokens
    inside, outside = split("token_spike", lambda e: e.app == "summarizer" and not e.is_error)
    assert len(inside) >= 8
    assert statistics.mean(e.total_tokens or 0 for e in inside) > 5 * statistics.mean(e.total_tokens or 0 for e in outside)

    # hot key: one key far above 100 calls a minute, every other key below it
    hot = KeyHasher(load_secret(settings.data_dir)).hash(HOT_KEY)
    a, b = window("hot_key")
    minutes = (b - a).total_seconds() / 60
    per_key = Counter(e.api_key_hash for e in calls if a <= e.ts < b)
    assert per_key[hot] / minutes > 100, per_key[hot] / minutes
    assert max(n for k, n in per_key.items() if k != hot) / minutes < 100
    assert all(a <= e.ts < b for e in calls if e.api_key_hash == hot)
    overall = Counter(e.api_key_hash for e in calls)
    assert max(n for k, n in overall.items() if k != hot) / (schedule.total_s / 60) < 100

    # GPU pinned: simulated GPU 0 at ~98% inside its window, ordinary outside
    samples: list[GpuSample] = all_events(settings, "gpu", GpuSample, stats.gpu_samples)
    assert len(samples) == stats.gpu_samples
    a, b = window("gpu_pinned")
    g0_in = [s.utilization_gpu_pct for s in samples if s.gpu_index == 0 and a <= s.ts < b]
    g0_out = [s.utilization_gpu_pct for s in samples if s.gpu_index == 0 and not a <= s.ts < b]
    assert len(g0_in) == 12 and min(g0_in) >= 95
    assert max(g0_out) < 80 and max(s.utilization_gpu_pct for s in samples if s.gpu_index == 1) < 80


def test_daily_rhythm_and_schedule_scaling() -> None:
    night = daily_rhythm(datetime(2025, 1, 1, 3, tzinfo=UTC))
    afternoon = daily_rhythm(datetime(2025, 1, 1, 14, tzinfo=UTC))
    assert night == pytest.approx(0.3) and afternoon > 0.95
    s = default_schedule(0.05)
    assert s.total_s == pytest.approx(27) and s.first("hot_key").duration_s == pytest.approx(3)
    assert [i.kind for i in s.incidents] == ["error_burst", "latency_spike", "token_spike", "hot_key", "gpu_pinned"]


@pytest.fixture
def upstream() -> Iterator[MockUpstream]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    mock = asyncio.run_coroutine_threadsafe(start_mock_upstream(), loop).result(30)
    yield mock
    asyncio.run_coroutine_threadsafe(mock.stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def test_http_mode_sends_openai_requests_with_incidents(make_settings: Callable[..., Settings], upstream: MockUpstream) -> None:
    settings = make_settings()
    schedule = Schedule((Incident("error_burst", 0, 10, "gpt-4o-mini", 1.0),), 2.0)
    gen = LoadGenerator(settings, schedule, mode="http", base_url=upstream.base_url, rate_per_s=15, seed=5,
                        rhythm=None, gpu=False)
    stats = gen.run()
    assert stats.calls >= 10 and stats.http_failures == 0
    assert upstream.stats.requests == stats.calls
    assert stats.by_incident["error_burst"] >= 1
    assert upstream.stats.errors == stats.errors  # the burst reached the upstream as x-mock-status
    paths = set(upstream.stats.by_path)
    assert {"/v1/chat/completions", "/v1/messages"} <= paths  # Claude models via the Messages API


def test_realtime_kafka_mode_in_a_thread(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    gen = LoadGenerator(settings, default_schedule(0.05), rate_per_s=20, rhythm=None, repeat=True,
                        gpu_interval_s=0.2).start()
    try:
        calls = all_events(settings, "calls", CallEvent, 10, quiet_s=0)
        gpu = all_events(settings, "gpu", GpuSample, 4, quiet_s=0)
    finally:
        gen.stop()
    assert len(calls) >= 10 and len(gpu) >= 4
    assert abs((calls[0].ts - datetime.now(UTC)).total_seconds()) < 60
