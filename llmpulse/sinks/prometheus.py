"""LLM metrics for Prometheus, named after the OpenTelemetry GenAI conventions, from the aggregates.

Where: the dashboard process (`llmpulse dashboard`, and `up`) consumes `<prefix>aggregates` in a
consumer group of its own (`<prefix>llm-metrics`) and serves these families on its `/metrics`
beside the pipeline's health. The worker's windows are the source, not raw calls: one update per
window and label set, so the series are exactly the combinations of `llm_metrics.labels`
(default model, provider, app) that occur, whatever the call rate. Only `calls` windows of the
smallest worker window size whose dimension set is exactly that label set are counted (the
worker aggregates that set; every call is in exactly one of those windows).

    gen_ai_client_operation_duration_seconds   histogram, OTel's advised buckets
    gen_ai_client_operation_time_to_first_chunk_seconds   histogram (streamed calls with a TTFT)
    gen_ai_client_token_usage{gen_ai_token_type="input"|"output"}   histogram, sum and count only
    llmpulse_gen_ai_requests_total, llmpulse_gen_ai_errors_total{error_type}, llmpulse_gen_ai_cost_usd_total
    llmpulse_gen_ai_window_end_timestamp_seconds   gauge: end of the newest window counted (freshness)

Labels follow the conventions' attribute names: model -> gen_ai_request_model, provider ->
gen_ai_provider_name, app -> service_name, operation -> gen_ai_operation_name, user -> user_id,
api_key_hash -> api_key_hash. `gen_ai_client_token_usage` is a histogram, as the convention
defines it (so queries written for OTel-exported data, `rate(..._sum)` by token type, work), but
its only bucket is +Inf: the aggregates carry each window's token sums, not per-call counts; its
`_sum` and `_count` (calls) are exact. Duration and TTFT buckets come from the window's DDSketch
(a call within 1% of a bound may be counted in the bucket beside its own); their sums are exact.

Counted once (the guarantee). A window reaches this consumer more than once: Kafka re-delivers,
the worker re-publishes a window after a restart (same revision), and publishes it again with a
higher revision when backfilled events correct it. Each window is remembered by its aggregate id
with the figures already added: a revision at or below the remembered one adds nothing; a higher
one adds only its increase over what was added (never a decrease: counters only go up, and the
figures added are kept as the per-field maximum). A revision above 1 of a window this process
never saw adds nothing: its earlier revision was counted before this process started (or by the
group member that owned the partition then). Windows are remembered for `REMEMBER_S` past the
newest window end seen, longer than the worker re-publishes a window (15 minutes).
Offsets are committed before a batch is applied: a crash loses at most the batch in hand (these
counters restart from zero with the process anyway) and never counts a batch twice; a new group
member starts after the committed offsets, a first start at the topic's end. Every member of the
group serves the share of the partitions it owns: sum across instances in PromQL.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from llmpulse.config import Settings
from llmpulse.schemas.aggregate import LATENCY_BUCKETS_S, TTFT_BUCKETS_S, WindowAggregate
from llmpulse.schemas.codec import decode

log = logging.getLogger(__name__)

LABEL_NAMES = {
    "model": "gen_ai_request_model",
    "provider": "gen_ai_provider_name",
    "app": "service_name",
    "operation": "gen_ai_operation_name",
    "user": "user_id",
    "api_key_hash": "api_key_hash",
}
"""Call dimension -> Prometheus label: the OTel attribute name with dots as underscores."""
OTHER = "_OTHER"  # the conventions' fallback value of error.type
REMEMBER_S = 3600.0
NANO = 1_000_000_000

LabelValues = tuple[str, ...]


@dataclass
class Figures:
    """What one window adds to its series (costs in nano-dollars, durations in ms: exact sums)."""

    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    cost_nano: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    latency_sum_ms: float = 0.0
    latency_hist: list[int] = field(default_factory=list)
    ttft_count: int = 0
    ttft_sum_ms: float = 0.0
    ttft_hist: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, agg: WindowAggregate) -> Figures:
        def hist(h: list[int], bounds: tuple[float, ...]) -> list[int]:
            return list(h) if len(h) == len(bounds) + 1 else [0] * (len(bounds) + 1)

        return cls(
            requests=agg.requests, errors=dict(agg.errors_by_type), cost_nano=round(agg.cost_usd * NANO),
            input_tokens=agg.prompt_tokens, output_tokens=agg.completion_tokens,
            latency_sum_ms=agg.latency_sum_ms, latency_hist=hist(agg.latency_hist, LATENCY_BUCKETS_S),
            ttft_count=agg.ttft_count, ttft_sum_ms=agg.ttft_sum_ms, ttft_hist=hist(agg.ttft_hist, TTFT_BUCKETS_S),
        )  # fmt: skip

    def increase_over(self, old: Figures) -> Figures:
        """What this revision adds over `old` (what was already added): never below zero per field."""

        def up(a: float, b: float) -> Any:
            return max(a - b, 0)

        return Figures(
            requests=up(self.requests, old.requests),
            errors={t: up(n, old.errors.get(t, 0)) for t, n in self.errors.items()},
            cost_nano=up(self.cost_nano, old.cost_nano),
            input_tokens=up(self.input_tokens, old.input_tokens),
            output_tokens=up(self.output_tokens, old.output_tokens),
            latency_sum_ms=up(self.latency_sum_ms, old.latency_sum_ms),
            latency_hist=[up(a, b) for a, b in zip(self.latency_hist, old.latency_hist, strict=True)],
            ttft_count=up(self.ttft_count, old.ttft_count),
            ttft_sum_ms=up(self.ttft_sum_ms, old.ttft_sum_ms),
            ttft_hist=[up(a, b) for a, b in zip(self.ttft_hist, old.ttft_hist, strict=True)],
        )

    def add(self, d: Figures) -> None:
        self.requests += d.requests
        for t, n in d.errors.items():
            self.errors[t] = self.errors.get(t, 0) + n
        self.cost_nano += d.cost_nano
        self.input_tokens += d.input_tokens
        self.output_tokens += d.output_tokens
        self.latency_sum_ms += d.latency_sum_ms
        self.latency_hist = [a + b for a, b in zip(self.latency_hist or [0] * len(d.latency_hist), d.latency_hist, strict=True)]
        self.ttft_count += d.ttft_count
        self.ttft_sum_ms += d.ttft_sum_ms
        self.ttft_hist = [a + b for a, b in zip(self.ttft_hist or [0] * len(d.ttft_hist), d.ttft_hist, strict=True)]

    def peak(self, other: Figures) -> Figures:
        """Field by field the larger: what has been added once both were applied."""
        return Figures(
            requests=max(self.requests, other.requests),
            errors={t: max(self.errors.get(t, 0), other.errors.get(t, 0)) for t in {*self.errors, *other.errors}},
            cost_nano=max(self.cost_nano, other.cost_nano),
            input_tokens=max(self.input_tokens, other.input_tokens),
            output_tokens=max(self.output_tokens, other.output_tokens),
            latency_sum_ms=max(self.latency_sum_ms, other.latency_sum_ms),
            latency_hist=[max(a, b) for a, b in zip(self.latency_hist, other.latency_hist, strict=True)],
            ttft_count=max(self.ttft_count, other.ttft_count),
            ttft_sum_ms=max(self.ttft_sum_ms, other.ttft_sum_ms),
            ttft_hist=[max(a, b) for a, b in zip(self.ttft_hist, other.ttft_hist, strict=True)],
        )


@dataclass
class Seen:
    revision: int
    end_s: float
    added: Figures  # what the window's revisions so far have added (or, first seen above 1, were counted with)


class LlmMetrics(Collector):
    """The counters, fed window by window (`apply`), exposed as Prometheus families (`collect`)."""

    def __init__(self, labels: Iterable[str], window_s: int, max_error_types: int = 50) -> None:
        self.dims = tuple(labels)
        self.dims_sorted = sorted(self.dims)
        self.label_names = [LABEL_NAMES[d] for d in self.dims]
        self.window_s = window_s
        self.max_error_types = max_error_types
        self.series: dict[LabelValues, Figures] = {}
        self.seen: dict[str, Seen] = {}
        self.error_types: set[str] = set()
        self.newest_end_s = 0.0
        self.applied = 0
        self.skipped = 0
        self._lock = threading.Lock()

    def wants(self, agg: WindowAggregate) -> bool:
        return agg.kind == "calls" and agg.window_s == self.window_s and sorted(agg.dimensions) == self.dims_sorted

    def apply(self, agg: WindowAggregate) -> bool:
        """Count one published window (see the module docstring); True when it changed a series."""
        if not self.wants(agg):
            return False
        end_s = agg.window_end.timestamp()
        new = Figures.of(agg)
        with self._lock:
            new.errors = self._bounded_errors(new.errors)
            seen = self.seen.get(agg.aggregate_id)
            if seen is not None and agg.revision <= seen.revision:
                self.skipped += 1
                return False
            if seen is None and agg.revision > 1:
                # its first revision was published before this process started, or counted by the
                # group member that owned the partition then: only later revisions add, from here
                self.seen[agg.aggregate_id] = Seen(agg.revision, end_s, new)
                self.skipped += 1
                return False
            delta = new if seen is None else new.increase_over(seen.added)
            added = new if seen is None else seen.added.peak(new)
            self.seen[agg.aggregate_id] = Seen(agg.revision, end_s, added)
            key = tuple(agg.dimensions[d] for d in self.dims)
            series = self.series.get(key)
            if series is None:
                series = self.series[key] = Figures()
            series.add(delta)
            self.applied += 1
            if end_s > self.newest_end_s:
                self.newest_end_s = end_s
                self._forget(end_s - REMEMBER_S)
        return True

    def _bounded_errors(self, errors: dict[str, int]) -> dict[str, int]:
        out: dict[str, int] = {}
        for t, n in errors.items():
            if t not in self.error_types and len(self.error_types) < self.max_error_types:
                self.error_types.add(t)
            name = t if t in self.error_types else OTHER
            out[name] = out.get(name, 0) + n
        return out

    def _forget(self, before_s: float) -> None:
        for k in [k for k, s in self.seen.items() if s.end_s < before_s]:
            del self.seen[k]

    # -- exposition ---------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        names = self.label_names
        duration = HistogramMetricFamily(
            "gen_ai_client_operation_duration", "Duration of GenAI operations (calls), from llmpulse's windows",
            labels=names, unit="seconds",
        )  # fmt: skip
        ttft = HistogramMetricFamily(
            "gen_ai_client_operation_time_to_first_chunk",
            "Time to the first chunk of streamed calls, from llmpulse's windows", labels=names, unit="seconds",
        )  # fmt: skip
        tokens = HistogramMetricFamily(
            "gen_ai_client_token_usage", "Input and output tokens used (sum and count exact; one +Inf bucket)",
            labels=[*names, "gen_ai_token_type"],
        )  # fmt: skip
        requests = CounterMetricFamily("llmpulse_gen_ai_requests", "LLM calls", labels=names)
        errors = CounterMetricFamily("llmpulse_gen_ai_errors", "Failed LLM calls by error type", labels=[*names, "error_type"])
        cost = CounterMetricFamily("llmpulse_gen_ai_cost_usd", "Cost of LLM calls in USD (price table)", labels=names)
        newest = GaugeMetricFamily(
            "llmpulse_gen_ai_window_end_timestamp_seconds",
            "End of the newest window counted into the gen_ai metrics (0: none yet); now minus this is their delay",
        )  # fmt: skip
        with self._lock:
            items = [(k, _copy(f)) for k, f in self.series.items()]
            newest.add_metric([], self.newest_end_s)
        for key, f in items:
            values = list(key)
            duration.add_metric(values, _buckets(f.latency_hist, LATENCY_BUCKETS_S), f.latency_sum_ms / 1000)
            ttft.add_metric(values, _buckets(f.ttft_hist, TTFT_BUCKETS_S), f.ttft_sum_ms / 1000)
            tokens.add_metric([*values, "input"], [("+Inf", float(f.requests))], float(f.input_tokens))
            tokens.add_metric([*values, "output"], [("+Inf", float(f.requests))], float(f.output_tokens))
            requests.add_metric(values, float(f.requests))
            for t, n in sorted(f.errors.items()):
                errors.add_metric([*values, t], float(n))
            cost.add_metric(values, f.cost_nano / NANO)
        yield from (duration, ttft, tokens, requests, errors, cost, newest)


def _copy(f: Figures) -> Figures:
    return Figures(f.requests, dict(f.errors), f.cost_nano, f.input_tokens, f.output_tokens, f.latency_sum_ms,
                   list(f.latency_hist), f.ttft_count, f.ttft_sum_ms, list(f.ttft_hist))  # fmt: skip


def _buckets(hist: list[int], bounds: tuple[float, ...]) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs, +Inf last, from per-bucket counts (empty: all zero)."""
    counts = hist or [0] * (len(bounds) + 1)
    out: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip((*(repr(float(b)) for b in bounds), "+Inf"), counts, strict=True):
        running += n
        out.append((bound, float(running)))
    return out


class AggregateMetricsConsumer:
    """Consumes `<prefix>aggregates` in group `<prefix>llm-metrics` in a daemon thread, feeding an
    `LlmMetrics` registered in a prometheus-client registry. Never raises into its host process:
    a broker that is down is retried, a value that does not decode is skipped (the sink dead-letters it)."""

    def __init__(self, settings: Settings, registry: CollectorRegistry = REGISTRY) -> None:
        cfg = settings.llm_metrics
        self.settings = settings
        self.metrics = LlmMetrics(cfg.labels, min(settings.worker.windows_s), cfg.max_error_types)
        self.registry = registry
        self.topic = settings.kafka.topic("aggregates")
        self.group = f"{settings.kafka.topic_prefix}llm-metrics"
        self.assigned = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> AggregateMetricsConsumer:
        try:
            self.registry.register(self.metrics)
        except ValueError as exc:  # a second dashboard in one process: the first one serves them
            log.warning("LLM metrics not served by this server: %s", exc)
            return self
        self._thread = threading.Thread(target=self._run, name="llmpulse-llm-metrics", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with contextlib.suppress(KeyError):  # never registered: start() was not called
            self.registry.unregister(self.metrics)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._consume()
            except Exception as exc:  # the dashboard keeps serving; the metrics resume with Kafka
                log.warning("LLM metrics: cannot consume %s (%s); retrying", self.topic, exc)
                self._stop.wait(5.0)

    def _consume(self) -> None:
        from confluent_kafka import Consumer, TopicPartition

        from llmpulse.kafka.bootstrap import resolve_bootstrap
        from llmpulse.kafka.clients import consumer_settings
        from llmpulse.kafka.topics import ensure_topics

        bootstrap = resolve_bootstrap(self.settings)
        ensure_topics(bootstrap, self.settings.kafka, timeout=10.0)  # a consumer of a missing topic may get no assignment
        consumer = Consumer(consumer_settings(bootstrap, self.settings.kafka, self.group, **{"auto.offset.reset": "latest"}))
        try:
            consumer.subscribe([self.topic], on_assign=lambda c, parts: self.assigned.set())
            while not self._stop.is_set():
                msgs = consumer.consume(500, 0.5)
                good = [m for m in msgs if m.error() is None]
                if not good:
                    continue
                # committed before applied: a crash loses the batch in hand, never counts it twice
                ends: dict[tuple[str, int], int] = {}
                for m in good:
                    tp = (str(m.topic()), int(m.partition() or 0))
                    ends[tp] = max(ends.get(tp, -1), int(m.offset() or 0) + 1)
                consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in ends.items()], asynchronous=False)
                for m in good:
                    for agg in decode(m.value(), WindowAggregate).valid:
                        self.metrics.apply(agg)
        finally:
            consumer.close()
