"""Batch INSERTs into ClickHouse under deduplication tokens (retried by the sink's write step)."""

from __future__ import annotations

import time
from datetime import UTC
from typing import Any

from llmpulse import metrics
from llmpulse.sinks.clickhouse.rows import TableSpec

INSERT_SETTINGS = {
    # a dependent roll-up skips a block whose token it has already seen, like the raw table
    "deduplicate_blocks_in_dependent_materialized_views": 1,
    "insert_deduplicate": 1,
    # no replacing/aggregating pass over each inserted block: raw rows are unique per batch (twins of
    # re-delivered events are replaced when parts merge, or read with FINAL), and the views' blocks
    # are already grouped by their key; saves ~10 % of an INSERT's time
    "optimize_on_insert": 0,
}


class BatchWriter:
    """INSERTs one table's batch, carrying a deduplication token when given one.

    A token names the batch by its Kafka offsets; ClickHouse drops a block whose token
    the table (or a roll-up fed by its materialized view) has already stored, so
    writing the same batch again never counts it twice.
    """

    def __init__(self, client: Any, database: str) -> None:
        self.client = client
        self.database = database

    def insert(self, spec: TableSpec, items: list[Any], token: str | None = None) -> None:
        if not items:
            return
        settings: dict[str, Any] = dict(INSERT_SETTINGS)
        if token is not None:
            settings["insert_deduplication_token"] = token
        t0 = time.perf_counter()
        table = f"{self.database}.{spec.table}"
        if spec.arrow is not None:
            self.client.raw_insert(table, spec.columns, spec.arrow(items), settings=settings, fmt="ArrowStream")
        else:
            self.client.insert(table, items, column_names=spec.columns, settings=settings)
        metrics.SINK_INSERT_SECONDS.labels(spec.table).observe(time.perf_counter() - t0)
        metrics.SINK_BATCH_ROWS.labels(spec.table).observe(len(items))
        metrics.EVENTS_OUT.labels("sink", spec.table).inc(len(items))

    def present_ids(self, spec: TableSpec, items: list[Any], chunk: int = 20_000) -> set[str]:
        """The ids of these events (objects with `spec.id_column` and `ts`) already in the table;
        the lookup is bounded by the events' time range (partition pruning)."""
        if not items:
            return set()
        ts = [e.ts for e in items]
        lo, hi = (t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f") for t in (min(ts), max(ts)))
        col = spec.id_column
        found: set[str] = set()
        for i in range(0, len(items), chunk):
            ids = [str(getattr(e, col)) for e in items[i : i + chunk]]
            res = self.client.query(
                f"SELECT DISTINCT {col} FROM {self.database}.{spec.table} "
                "WHERE ts >= toDateTime64({lo:String}, 3, 'UTC') AND ts <= toDateTime64({hi:String}, 3, 'UTC') "
                f"AND {col} IN {{ids:Array(String)}}",
                parameters={"lo": lo, "hi": hi, "ids": ids},
            )
            found.update(str(r[0]) for r in res.result_rows)
        return found

    def record_intent(self, spec: TableSpec, topic: str, token: str, ranges: list[tuple[int, int, int]], rows: int) -> None:
        """Write down a batch before its INSERT, so that a successor can rebuild it exactly."""
        self.client.insert(
            f"{self.database}.sink_intents",
            [[spec.table, token, topic, ranges, rows]],
            column_names=["table", "token", "topic", "ranges", "rows"],
        )

    def intents(self, topics: list[str], limit: int = 1000) -> list[tuple[str, str, list[tuple[int, int, int]]]]:
        """The latest recorded batches of these topics: (topic, token, ranges)."""
        if not topics:
            return []
        res = self.client.query(
            f"SELECT topic, token, ranges FROM {self.database}.sink_intents FINAL "
            "WHERE topic IN {topics:Array(String)} ORDER BY ts DESC LIMIT {limit:UInt32}",
            parameters={"topics": topics, "limit": limit},
        )
        out = []
        for topic, token, ranges in res.result_rows:
            triples = [tuple(x.values()) if isinstance(x, dict) else tuple(x) for x in ranges]
            out.append((str(topic), str(token), [(int(p), int(a), int(b)) for p, a, b in triples]))
        return out

