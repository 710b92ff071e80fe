"""The pipeline's own health, in the Prometheus exposition format.

Every component records into these; each long-running command serves them on
`/metrics` (prometheus-client). Not imported by the light SDK.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_IN = Counter(
    "llmpulse_events_in_total", "Events consumed or received", ["component", "topic"]
)
EVENTS_OUT = Counter(
    "llmpulse_events_out_total", "Events produced or written", ["component", "topic"]
)
CONSUMER_LAG = Gauge(
    "llmpulse_consumer_lag_messages", "Messages behind the partition's end", ["component", "topic", "partition"]
)
DEAD_LETTERS = Counter(
    "llmpulse_dead_letters_total", "Inputs sent to the dead-letter topic", ["component", "kind"]
)
OTLP_SPANS = Counter(
    "llmpulse_otlp_spans_total",
    "Spans received on ingest's /v1/traces: accepted (a CallEvent), rejected (dead-lettered), "
    "not_genai and not_a_model_call (agent/tool spans) skipped",
    ["outcome"],
)
WINDOW_CLOSE_DELAY = Histogram(
    "llmpulse_window_close_delay_seconds",
    "Wall-clock time between a window's end and its publication",
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
)
OFFSET_GAPS = Counter(
    "llmpulse_worker_offset_gaps_total",
    "Offsets the consumer skipped; the worker went back for them (accepted: held no messages)",
    ["topic", "outcome"],
)
DUPLICATES = Counter(
    "llmpulse_worker_duplicates_total",
    "Copies of events already counted in an open or recently closed window (same event_id), dropped",
    ["kind"],
)
LATE_REVISED = Counter(
    "llmpulse_worker_late_events_total",
    "Events that arrived after their window closed, within worker.allowed_lateness_s, counted in a new revision",
    ["kind"],
)
WINDOWS_CLOSED = Counter("llmpulse_windows_closed_total", "Windows closed and published", ["kind"])
SINK_BATCH_ROWS = Histogram(
    "llmpulse_sink_batch_rows",
    "Rows per ClickHouse INSERT",
    ["table"],
    buckets=(1, 10, 100, 1000, 5000, 10_000, 50_000, 100_000, 500_000),
)
SINK_INSERT_SECONDS = Histogram(
    "llmpulse_sink_insert_seconds",
    "Duration of one ClickHouse INSERT",
    ["table"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SINK_INSERT_FAILURES = Counter(
    "llmpulse_sink_insert_failures_total", "Failed ClickHouse INSERTs (retried)", ["table"]
)
SINK_LOST_BLOCKS = Counter(
    "llmpulse_sink_lost_blocks_total",
    "Rebuilt batches whose token ClickHouse had recorded without their rows (written again)",
    ["table"],
)
SINK_ROLLUP_REPAIRS = Counter(
    "llmpulse_sink_rollup_repairs_total",
    "Rebuilt batches whose block a roll-up had lost (its token kept, its part not): written again",
    ["table"],
)
SINK_ROLLUP_MISMATCHES = Counter(
    "llmpulse_sink_rollup_mismatches_total",
    "Rebuilt batches after which a roll-up disagrees with llm_calls in a way the sink cannot repair",
    ["table"],
)
PROXY_OVERHEAD_SECONDS = Histogram(
    "llmpulse_proxy_overhead_seconds",
    "Latency the proxy adds to a request",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1),
)
PUBLISH_SPOOL_BYTES = Gauge("llmpulse_publish_spool_bytes", "Bytes waiting in the publish spool", ["component"])
PUBLISH_DROPPED = Counter(
    "llmpulse_publish_dropped_total", "Events dropped past the spool limit", ["component"]
)
NOTIFICATIONS = Counter(
    "llmpulse_notifications_total", "Notifications by receiver and outcome", ["receiver", "outcome"]
)
ALERTS_PUBLISHED = Counter("llmpulse_alerts_published_total", "Alert events published", ["severity", "state"])
