"""Batch INSERTs into ClickHouse, with retries and backoff; never drops a batch."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from llmpulse import metrics
from llmpulse.sinks.clickhouse.rows import TableSpec

log = logging.getLogger(__name__)


class BatchWriter:
    def __init__(self, client: Any, database: str) -> None:
        self.client = client
        self.database = database

    def insert(self, spec: TableSpec, rows: list[list[Any]]) -> None:
        if not rows:
            return
        t0 = time.perf_counter()
        self.client.insert(f"{self.database}.{spec.table}", rows, column_names=spec.columns)
        metrics.SINK_INSERT_SECONDS.labels(spec.table).observe(time.perf_counter() - t0)
        metrics.SINK_BATCH_ROWS.labels(spec.table).observe(len(rows))
        metrics.EVENTS_OUT.labels("sink", spec.table).inc(len(rows))


def retry_forever(
    action: Callable[[], None],
    what: str,
    initial_s: float,
    max_s: float,
    should_stop: Callable[[], bool],
    on_wait: Callable[[float], None],
) -> bool:
    """Run `action` until it succeeds (True) or `should_stop` (False); waits grow exponentially."""
    delay = initial_s
    while True:
        try:
            action()
            return True
        except Exception as exc:
            log.warning("%s failed (%s); retrying in %.1f s", what, exc, delay)
            if should_stop():
                return False
            on_wait(delay)
            delay = min(max_s, delay * 2)
