"""Read-only SQL over llmpulse's tables, with limits on what one query may cost.

Guarantee: a user's query reads llmpulse's tables and the allow-listed system tables, and
nothing else (`query_guard`: ClickHouse's own parser and analyzer decide what it reads);
it runs with ClickHouse's readonly=1 (no writes, no file/url/remote table functions, no
SETTINGS of its own), and it stops with a clear reason past the rows or bytes it may read,
its memory or its time. Defends against a dashboard or API user reading the host's files,
reaching its network, or running the store's owner (the sink) out of CPU or memory.
"""

from __future__ import annotations

import re
import time
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, Field

from llmpulse.analysis.query_guard import QueryLimitExceeded, QueryRefused, guard
from llmpulse.errors import LLMPulseError

__all__ = ["QueryLimitExceeded", "QueryLimits", "QueryRefused", "QueryResult", "jsonable", "run_readonly"]


class QueryResult(BaseModel):
    columns: list[str]
    rows: list[list[Any]]
    truncated: bool = False
    max_rows: int = 0
    elapsed_ms: float = 0.0


class QueryLimits(BaseModel):
    """What one query may read and use (clickhouse.query_max_* in the config)."""

    max_rows_to_read: int = Field(default=200_000_000, ge=1)
    max_bytes_to_read: int = Field(default=20 * 2**30, ge=1)
    max_memory_bytes: int = Field(default=2 * 2**30, ge=1)

    @classmethod
    def of(cls, ch: Any) -> QueryLimits:
        """From a ClickHouseConfig (or anything with its query_max_* fields)."""
        return cls(
            max_rows_to_read=ch.query_max_rows_to_read,
            max_bytes_to_read=ch.query_max_bytes_to_read,
            max_memory_bytes=ch.query_max_memory_bytes,
        )


def jsonable(v: Any) -> Any:
    if isinstance(v, datetime | date):
        return v.isoformat()
    if isinstance(v, Decimal):
        return float(v)
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    return v


def session_readonly(client: Any) -> int:
    """The readonly level of the client's user (0 for chDB; a server's reader profile sets 2)."""
    setting = getattr(client, "server_settings", {}).get("readonly")
    try:
        return int(setting.value) if setting is not None else 0
    except (AttributeError, ValueError):
        return 0


def engine_settings(limits: QueryLimits, max_rows: int, max_seconds: float, readonly: bool = True) -> dict[str, Any]:
    """The per-query settings; readonly last: chDB applies them in order and readonly=1 forbids
    changing any setting after it (measured with chDB 26.9). A session that is read-only
    already (a server user with readonly=2) may not change readonly at all: not sent then."""
    settings: dict[str, Any] = {
        "max_result_rows": max_rows + 1,
        "result_overflow_mode": "break",
        "max_execution_time": max_seconds,
        "timeout_overflow_mode": "throw",
        "max_rows_to_read": limits.max_rows_to_read,
        "max_bytes_to_read": limits.max_bytes_to_read,
        "read_overflow_mode": "throw",
        "max_memory_usage": limits.max_memory_bytes,
        "allow_introspection_functions": 0,
    }
    if readonly:
        settings["readonly"] = 1
    return settings


_CODE = re.compile(r"Code: (\d+)\.")


def _error(exc: Exception, limits: QueryLimits, max_seconds: float) -> LLMPulseError:
    """A clear error by ClickHouse's error code (chDB echoes the query's SETTINGS into every
    message, so the words of the message are not a safe test)."""
    text = str(exc)
    code = int(m.group(1)) if (m := _CODE.search(text)) else None
    if code == 164 or "(READONLY)" in text:
        return QueryRefused("refused: queries are read-only (ClickHouse readonly mode); INSERT, ALTER, DROP, "
                            "other writes, table functions and SETTINGS are not allowed here")  # fmt: skip
    if code == 497 or "(ACCESS_DENIED)" in text:
        return QueryRefused("refused: the ClickHouse user may not read this (ACCESS_DENIED)")
    if code == 159 or "TIMEOUT_EXCEEDED" in text:
        return QueryLimitExceeded(f"query stopped: it ran past the {max_seconds:g} s limit")
    if code == 158 or "(TOO_MANY_ROWS)" in text:
        return QueryLimitExceeded(
            f"query stopped: it would read more than {limits.max_rows_to_read:,} rows "
            "(clickhouse.query_max_rows_to_read); narrow the time range or filter on ts"
        )
    if code == 307 or "(TOO_MANY_BYTES)" in text:
        return QueryLimitExceeded(
            f"query stopped: it would read more than {limits.max_bytes_to_read:,} bytes "
            "(clickhouse.query_max_bytes_to_read); read fewer columns or a narrower time range"
        )
    if code == 241 or "(MEMORY_LIMIT_EXCEEDED)" in text:
        return QueryLimitExceeded(
            f"query stopped: it needs more than {limits.max_memory_bytes:,} bytes of memory "
            "(clickhouse.query_max_memory_bytes)"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    # the echo of our own settings says nothing to the user
    first = re.sub(r"\s*SETTINGS max_(result_rows|execution_time) = .*$", "", first)
    return LLMPulseError(f"query failed: {first}")


def run_readonly(
    client: Any, sql: str, database: str, max_rows: int, max_seconds: float, limits: QueryLimits | None = None
) -> QueryResult:
    """Check what `sql` reads (query_guard), then run it read-only within the limits."""
    limits = limits or QueryLimits()
    settings = engine_settings(limits, max_rows, max_seconds, readonly=session_readonly(client) == 0)

    # the EXPLAINs must come back whole: no result-row limit on them (their size is the query's)
    explain_settings = {k: v for k, v in settings.items() if k not in ("max_result_rows", "result_overflow_mode")}

    def lines(text: str, with_limits: bool) -> list[str]:
        res = client.query(text, settings=explain_settings if with_limits else {})
        return [str(r[0]) for r in res.result_rows]

    t0 = time.perf_counter()
    try:
        checked = guard(sql, database, lambda t: lines(t, False), lambda t: lines(t, True))
        res = client.query(checked, settings=settings)
    except QueryRefused:
        raise
    except Exception as exc:
        raise _error(exc, limits, max_seconds) from None
    rows = [list(map(jsonable, r)) for r in res.result_rows]
    truncated = len(rows) > max_rows
    return QueryResult(
        columns=list(res.column_names),
        rows=rows[:max_rows],
        truncated=truncated,
        max_rows=max_rows,
        elapsed_ms=(time.perf_counter() - t0) * 1000,
    )
