"""Human sentences for alerts: values in the metric's own unit, the dimensions, the window."""

from __future__ import annotations

from datetime import datetime

PERCENT_OF_ONE = frozenset({"error_rate", "success_rate", "intent_accuracy"})
PERCENT = frozenset({
    "gpu_util_avg_pct", "gpu_util_max_pct", "memory_util_avg_pct",
    "host_cpu_avg_pct", "host_cpu_max_pct", "host_memory_avg_pct", "host_memory_max_pct",
})  # fmt: skip
MILLIS = frozenset(
    {"latency_avg_ms", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "ttft_p95_ms"}
)


def fmt_value(metric: str, v: float | None, *, level: bool = False) -> str:
    """A value as people read it; ``level``: a configured threshold (no trailing zeros)."""
    if v is None:
        return "n/a"
    if metric in PERCENT_OF_ONE:
        return f"{v * 100:.4g}%" if level else f"{v * 100:.1f}%"
    if metric in PERCENT:
        return f"{v:.4g}%" if level else f"{v:.1f}%"
    if metric in MILLIS:
        return f"{v:,.0f} ms" if v < 10_000 or not level else f"{v / 1000:.4g} s"
    if metric == "cost_usd":
        return f"${v:,.2f}" if v >= 1 or v == 0 else f"${v:.4f}"
    if metric == "relevance_avg":
        return f"{v:.4g}/5" if level else f"{v:.2f}/5"
    if metric == "memory_used_max_bytes":
        return f"{v / 2**30:.1f} GiB"
    if metric == "temperature_max_c":
        return f"{v:.0f} °C"
    if metric == "power_avg_w":
        return f"{v:.0f} W"
    if float(v).is_integer():
        return f"{v:,.0f}"
    return f"{v:,.2f}" if abs(v) >= 1 else f"{v:.4g}"


def fmt_dims(dimensions: dict[str, str]) -> str:
    if not dimensions:
        return "overall"
    return "for " + ", ".join(f"{k}={dimensions[k]}" for k in sorted(dimensions))


def fmt_time(ts: datetime) -> str:
    return ts.strftime("%H:%M:%S UTC")


def fmt_window(window_s: int, end: datetime) -> str:
    return f"in {window_s} s window ending {fmt_time(end)}"


def fmt_span(seconds: int) -> str:
    if seconds > 86400 and seconds % 86400 == 0:
        return f"{seconds // 86400}d"
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
