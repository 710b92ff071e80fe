"""Wire models to ClickHouse rows: one converter per table, columns in one place."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from llmpulse.schemas import Alert, CallEvent, DeadLetter, Feedback, GpuSample, WindowAggregate
from llmpulse.schemas.action import ActionEvent
from llmpulse.schemas.base import WireModel
from llmpulse.schemas.codec import decode
from llmpulse.schemas.host import HostSample
from llmpulse.sinks.clickhouse import calls

_NANO = Decimal("0.000000001")


def _usd(v: float | None) -> Decimal | None:
    return None if v is None else Decimal(repr(v)).quantize(_NANO)


def call_row(e: CallEvent) -> list[Any]:
    return [
        e.event_id, e.ts, e.source, e.provider, e.model, e.response_model or "", e.operation,
        e.app, e.user or "", e.api_key_hash or "", e.status_code, e.error_type or "",
        int(e.is_error), e.latency_ms, e.ttft_ms, e.streamed, e.prompt_tokens,
        e.completion_tokens, e.total_tokens or 0, e.cached_tokens, e.reasoning_tokens,
        e.tokens_estimated, _usd(e.cost_usd), e.prompt, e.response,
    ]  # fmt: skip


CALL_COLUMNS = calls.CALL_COLUMNS

AGG_COLUMNS = [
    "aggregate_id", "kind", "window_s", "window_start", "window_end", "dims_key", "dimensions",
    "requests", "errors", "errors_by_type", "qps", "error_rate", "success_rate", "latency_sum_ms",
    "latency_avg_ms", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "ttft_p95_ms",
    "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd", "unpriced_requests",
    "feedback_count", "intent_accuracy", "relevance_avg", "samples", "gpu_util_avg_pct",
    "gpu_util_max_pct", "memory_used_max_bytes", "memory_util_avg_pct", "temperature_max_c",
    "power_avg_w", "revision",
    "host_cpu_avg_pct", "host_cpu_max_pct", "host_memory_avg_pct", "host_memory_max_pct", "host_load1_avg",
]  # fmt: skip


def aggregate_row(a: WindowAggregate) -> list[Any]:
    row: list[Any] = []
    for c in AGG_COLUMNS:
        v = getattr(a, c)
        row.append(_usd(v) if c == "cost_usd" else v)
    return row


GPU_COLUMNS = [
    "event_id", "ts", "host", "gpu_index", "gpu_uuid", "name", "utilization_gpu_pct",
    "utilization_memory_pct", "memory_used_bytes", "memory_total_bytes", "temperature_c",
    "power_draw_w", "power_limit_w", "processes",
]  # fmt: skip


def gpu_row(g: GpuSample) -> list[Any]:
    procs = json.dumps([p.model_dump(exclude={"schema_version"}) for p in g.processes])
    return [getattr(g, c) for c in GPU_COLUMNS[:-1]] + [procs]


HOST_COLUMNS = [
    "event_id", "ts", "host", "cpu_count", "cpu_pct", "memory_used_bytes", "memory_total_bytes",
    "memory_used_pct", "load1", "load5", "load15",
]  # fmt: skip


def host_row(h: HostSample) -> list[Any]:
    return [getattr(h, c) for c in HOST_COLUMNS]


FEEDBACK_COLUMNS = [
    "event_id", "call_event_id", "ts", "intent_correct", "relevance", "model", "app", "user", "comment",
]  # fmt: skip


def feedback_row(f: Feedback) -> list[Any]:
    return [f.event_id, f.call_event_id, f.ts, f.intent_correct, f.relevance, f.model or "", f.app, f.user or "", f.comment]


ALERT_COLUMNS = [
    "alert_id", "fingerprint", "rule", "severity", "state", "metric", "value", "threshold",
    "baseline", "dimensions", "window_start", "window_end", "started_at", "ts", "summary", "root_cause",
    "expected_low", "expected_high", "evidence",  # migration 7
]  # fmt: skip


def alert_row(a: Alert) -> list[Any]:
    return [getattr(a, c) for c in ALERT_COLUMNS[:15]] + [
        json.dumps(a.root_cause) if a.root_cause else "",
        a.expected_low,
        a.expected_high,
        json.dumps(a.evidence) if a.evidence else "",
    ]


DEADLETTER_COLUMNS = [
    "dead_letter_id", "ts", "kind", "reason", "source", "partition", "offset", "payload", "payload_encoding",
]  # fmt: skip


def deadletter_row(d: DeadLetter) -> list[Any]:
    return [getattr(d, c) for c in DEADLETTER_COLUMNS]


ACTION_COLUMNS = [
    "event_id", "action_id", "ts", "status", "kind", "rule", "alert_fingerprint", "alert_id",
    "target", "params", "expires_at", "actor", "reason",
]  # fmt: skip


def action_row(a: ActionEvent) -> list[Any]:
    return [getattr(a, c) for c in ACTION_COLUMNS[:9]] + [json.dumps(a.params, default=str)] + [
        getattr(a, c) for c in ACTION_COLUMNS[10:]
    ]


@dataclass(frozen=True)
class TableSpec:
    """How the events of one topic become rows of one table.

    `items(value)` turns one message value into buffered items and a count of invalid
    events; `arrow(items)` (when set) writes them as an Arrow stream, otherwise the
    items are rows in `columns` order for a Native INSERT. Arrow items are event objects
    (with `id_column` and `ts` attributes).
    """

    table: str
    model: type[WireModel]
    columns: list[str]
    to_row: Callable[[Any], list[Any]]
    id_column: str
    arrow: Callable[[list[Any]], bytes] | None = None
    rolled_up: bool = False
    """Materialized views sum this table's INSERTs into roll-ups: a row written twice counts
    twice there, even though the table itself replaces it by `id_column`."""

    def items(self, raw: bytes | None) -> tuple[list[Any], int]:
        if self.arrow is not None:
            return calls.decode_calls(raw)
        decoded = decode(raw, self.model)
        to_row = self.to_row
        return [to_row(e) for e in decoded.valid], len(decoded.rejected)


# topic name (without prefix) -> how its events become rows
TABLES: dict[str, TableSpec] = {
    "calls": TableSpec("llm_calls", CallEvent, CALL_COLUMNS, call_row, "event_id", calls.calls_arrow, rolled_up=True),
    "aggregates": TableSpec("llm_aggregates", WindowAggregate, AGG_COLUMNS, aggregate_row, "aggregate_id"),
    "gpu": TableSpec("gpu_samples", GpuSample, GPU_COLUMNS, gpu_row, "event_id"),
    "host": TableSpec("host_samples", HostSample, HOST_COLUMNS, host_row, "event_id"),
    "feedback": TableSpec("feedback", Feedback, FEEDBACK_COLUMNS, feedback_row, "event_id"),
    "alerts": TableSpec("alerts", Alert, ALERT_COLUMNS, alert_row, "alert_id"),
    "deadletter": TableSpec("deadletter", DeadLetter, DEADLETTER_COLUMNS, deadletter_row, "dead_letter_id"),
    "actions": TableSpec("actions", ActionEvent, ACTION_COLUMNS, action_row, "event_id"),
}
