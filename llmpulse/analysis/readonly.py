"""Read-only SQL, enforced by ClickHouse settings (readonly=2), never by parsing."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel

from llmpulse.errors import LLMPulseError


class QueryRefused(LLMPulseError):
    pass


class QueryResult(BaseModel):
    columns: list[str]
    rows: list[list[Any]]
    truncated: bool = False
    max_rows: int = 0
    elapsed_ms: float = 0.0


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


def run_readonly(client: Any, sql: str, database: str, max_rows: int, max_seconds: float) -> QueryResult:
    """Run `sql` with ClickHouse's own read-only mode and limits; writes are refused by the server."""
    import time

    settings = {
        "readonly": 2,
        "max_result_rows": max_rows + 1,
        "result_overflow_mode": "break",
        "max_execution_time": max_seconds,
    }
    t0 = time.perf_counter()
    try:
        res = client.query(sql, settings=settings)
    except Exception as exc:
        text = str(exc)
        # by the error code: chDB echoes the query's SETTINGS (readonly = '2') into every message
        if "(READONLY)" in text or "Code: 164." in text:
            raise QueryRefused(
                "refused: queries are read-only (ClickHouse readonly mode); "
                "INSERT, ALTER, DROP and other writes are not allowed here"
            ) from None
        if "TIMEOUT_EXCEEDED" in text:
            raise QueryRefused(f"query stopped: it ran past the {max_seconds:g} s limit") from None
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise LLMPulseError(f"query failed: {first}") from None
    rows = [list(map(jsonable, r)) for r in res.result_rows]
    truncated = len(rows) > max_rows
    return QueryResult(
        columns=list(res.column_names),
        rows=rows[:max_rows],
        truncated=truncated,
        max_rows=max_rows,
        elapsed_ms=(time.perf_counter() - t0) * 1000,
    )
