"""Batch INSERTs into ClickHouse under deduplication tokens (retried by the sink's write step)."""

from __future__ import annotations

import time
from bisect import bisect_left
from datetime import datetime, timedelta
from operator import attrgetter
from typing import Any

from llmpulse import metrics
from llmpulse.sinks.clickhouse.rows import TableSpec
from llmpulse.sinks.clickhouse.steps.rebuild import Intent

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
        """The ids of these events (objects with `spec.id_column` and `ts`) already in the table.

        One lookup per batch, bounded by the events' time spans (`time_spans`: partition
        pruning and the sort key's `ts`): the table's ids within them are read and matched
        here. Sending the batch's ids instead costs ~100 ms per 20,000 (the parameter is
        parsed on every query), more than reading the ids of the same seconds; that is the
        fallback when the spans hold many more rows than the batch (events spread over hours
        among a busy table)."""
        if not items:
            return set()
        col = spec.id_column
        want = set(map(attrgetter(col), items))
        where = spans_where(time_spans(list(map(attrgetter("ts"), items))))
        table = f"{self.database}.{spec.table}"
        most = max(4 * len(items), 20_000)
        res = self.client.query(f"SELECT {col} FROM {table} WHERE {where} LIMIT {most + 1}")
        if len(res.result_rows) <= most:
            return {x for r in res.result_rows if (x := str(r[0])) in want}
        found: set[str] = set()
        ids = sorted(want)
        for k in range(0, len(ids), chunk):
            res = self.client.query(
                f"SELECT DISTINCT {col} FROM {table} WHERE ({where}) AND {col} IN {{ids:Array(String)}}",
                parameters={"ids": ids[k : k + chunk]},
            )
            found.update(str(r[0]) for r in res.result_rows)
        return found

    def record_intent(
        self,
        spec: TableSpec,
        topic: str,
        token: str,
        ranges: list[tuple[int, int, int]],
        rows: int,
        skipped: frozenset[str] | None = None,
    ) -> None:
        """Write down a batch before its INSERT, so that a successor can rebuild it exactly: its
        offsets, and for a table with roll-ups the ids its INSERT leaves out (`skipped`; None: the
        batch is written whole, without deduplication by id)."""
        self.client.insert(
            f"{self.database}.sink_intents",
            [[spec.table, token, topic, ranges, rows, sorted(skipped or ()), int(skipped is not None)]],
            column_names=["table", "token", "topic", "ranges", "rows", "skipped_ids", "dedup_by_id"],
        )

    def intents(self, topics: list[str], limit: int = 1000) -> list[Intent]:
        """The latest recorded batches of these topics, newest first."""
        if not topics:
            return []
        res = self.client.query(
            f"SELECT topic, token, ranges, skipped_ids, dedup_by_id FROM {self.database}.sink_intents FINAL "
            "WHERE topic IN {topics:Array(String)} ORDER BY ts DESC LIMIT {limit:UInt32}",
            parameters={"topics": topics, "limit": limit},
        )
        out = []
        for topic, token, ranges, skipped, dedup in res.result_rows:
            triples = [tuple(x.values()) if isinstance(x, dict) else tuple(x) for x in ranges]
            out.append(
                Intent(
                    str(topic),
                    str(token),
                    [(int(p), int(a), int(b)) for p, a, b in triples],
                    frozenset(str(i) for i in skipped) if dedup else None,
                )
            )
        return out


def time_spans(ts: list[datetime], gap_s: float = 5.0, most: int = 16) -> list[tuple[int, int]]:
    """Spans of whole seconds, [first, last + 1) as Unix seconds, covering every one of these
    times: times less than `gap_s` apart share a span, and the closest spans are joined
    until at most `most` are left (a batch of live traffic with a few stragglers from a
    replayed spool: a few short spans, not one from the oldest straggler to now). Per span
    a few binary searches, no Python step per time: a batch is mostly in time order."""
    points = sorted(ts)
    gap = timedelta(seconds=gap_s)
    spans: list[list[datetime]] = []
    i, n = 0, len(points)
    while i < n:
        j = i
        while (k := bisect_left(points, points[j] + gap, j + 1)) - 1 > j:
            j = k - 1  # every time before points[j] + gap joins; go on from the last of them
        spans.append([points[i], points[j]])
        i = j + 1
    while len(spans) > most:
        k = min(range(len(spans) - 1), key=lambda j: spans[j + 1][0] - spans[j][1])
        spans[k : k + 2] = [[spans[k][0], spans[k + 1][1]]]
    return [(int(a.timestamp()), int(b.timestamp()) + 1) for a, b in spans]


def spans_where(spans: list[tuple[int, int]]) -> str:
    """A WHERE condition for rows whose `ts` lies in one of `time_spans`' spans. Integer
    literals of our own making (no user text): the sort key's `ts` compared with constants,
    so ClickHouse prunes partitions and granules."""
    return " OR ".join(f"(ts >= toDateTime64({lo}, 3, 'UTC') AND ts < toDateTime64({hi}, 3, 'UTC'))" for lo, hi in spans)
