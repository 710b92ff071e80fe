"""After a crash: a roll-up block lost between ClickHouse's deduplication log and its part, found and written again.

Guarantee: once a rebuilt batch of `llm_calls` is written, every roll-up counts its events
once (per bucket and key, `requests` equals the raw table's rows), or the sink says that it
cannot tell (an error in the log, `llmpulse_sink_rollup_mismatches_total`).

The failure it defends against: a plain MergeTree adds a block's token to its deduplication
log before it commits the block's part. A writer SIGKILLed between the two leaves the token
without the part. steps/write.py repairs that for the raw table, by its event ids. A roll-up
fed by a view has the same gap (the token extended by view and block number in its log, the
states nowhere), and the rebuilt INSERT's block is then skipped by that roll-up for good: a
CI run of test_sink_kill lost one 1,000-row batch from one minute of `llm_calls_1m` while
`llm_calls` held every event. A roll-up holds states, not events, so the loss cannot be seen
per event; it is seen per bucket and key.

How: for the buckets and keys the rebuilt batch touches, each roll-up's `requests` is
compared with the raw table's rows (FINAL). A roll-up short by exactly the batch's rows lost
its block; one equal to the raw table holds it; anything else is a mismatch this check
cannot explain, reported and never "fixed". The roll-ups form a chain (schema.CHAIN) and an
INSERT into one also feeds those downstream of it, so a lost block is written again (its
view's SELECT over the batch's rows, read back from `llm_calls`, under a fresh token) into
the first roll-up of the chain that lacks it, and only when every roll-up downstream of that
one lacks it too: there the cascade counts it once. If one downstream already holds it, the
cascade would count it twice there, so nothing is written and the mismatch is reported.

Exact because one sink writes a key's rows one batch at a time (producers key calls by model;
the sink's INSERTs never overlap), so when a rebuilt batch has been written, the only block
that can be missing from its buckets is its own (a crash interrupts one INSERT). Runs only
for rebuilt batches (after a crash), a few small queries per roll-up. Not on a cluster:
ReplicatedMergeTree commits a block's id and its part in one Keeper transaction.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from operator import attrgetter
from typing import Any

from llmpulse import metrics
from llmpulse.config.clickhouse import ClickHouseConfig
from llmpulse.sinks.clickhouse.schema import CHAIN, rollup_view_query
from llmpulse.sinks.clickhouse.writer import INSERT_SETTINGS, spans_where, time_spans

log = logging.getLogger(__name__)

RAW = "llm_calls"
BUCKET_S = {"toStartOfMinute": 60, "toStartOfHour": 3600}
"""A roll-up's bucket function -> its bucket's width in seconds."""

Key = tuple[Any, ...]


class RollupAudit:
    """Checks the roll-ups of `llm_calls` after a rebuilt batch's INSERT; see the module docstring."""

    def __init__(self, client: Any, cfg: ClickHouseConfig) -> None:
        self.client = client
        self.cfg = cfg
        self.db = cfg.database

    def check(self, rows: list[Any], token: str) -> dict[str, str]:
        """Each roll-up's state for the batch that wrote `rows` (event objects with `event_id`
        and `ts`) under `token`: "holds", "lacks" or "mismatch"; a lost block is written
        again before it returns ("lacks" then says what was found)."""
        if not rows:
            return {}
        ids = sorted(set(map(attrgetter("event_id"), rows)))
        batch = self._batch_rows(time_spans(list(map(attrgetter("ts"), rows))))
        # the batch's rows counted once, per minute and key; each roll-up's buckets are sums of these
        minutes = self._counts(
            f"SELECT toUnixTimestamp(toStartOfMinute(ts, 'UTC')) AS b, model, provider, app, count() FROM {batch} "
            "GROUP BY b, model, provider, app",
            ids,
        )
        state: dict[str, str] = {}
        for table in CHAIN:  # sources first
            state[table] = self._state(table, self._bucketed(minutes, table))
        for table, st in state.items():
            if st != "lacks" or state.get(CHAIN[table][0]) == "lacks":
                continue  # holds, or lacks and is fed by the repair of its source
            below = self._downstream(table)
            if all(state[d] == "lacks" for d in below):
                self._write_again(table, batch, ids, token)
                metrics.SINK_ROLLUP_REPAIRS.labels(table).inc()
                log.warning("rebuilt batch %s: %s%s lacked its %d events (a writer killed between ClickHouse's "
                            "deduplication log and the roll-up's part); written again",
                            token, table, f" and {', '.join(below)}" if below else "", len(ids))  # fmt: skip
            else:
                held = [d for d in below if state[d] != "lacks"]
                metrics.SINK_ROLLUP_MISMATCHES.labels(table).inc()
                log.error("rebuilt batch %s: %s lacks its %d events but %s downstream of it does not; writing them "
                          "again would count them twice there, so they are not written", token, table, len(ids),
                          ", ".join(held))  # fmt: skip
        for table, st in state.items():
            if st == "mismatch":
                metrics.SINK_ROLLUP_MISMATCHES.labels(table).inc()
                log.error("rebuilt batch %s: %s differs from %s in the batch's buckets by other than the batch's "
                          "events; left as it is", token, table, RAW)  # fmt: skip
        return state

    # -- the three counts of one roll-up ------------------------------------------------------
    def _batch_rows(self, spans: list[tuple[int, int]]) -> str:
        """The batch's rows as `llm_calls` holds them, one per id ({ids} is a query parameter)."""
        return f"(SELECT * FROM {self.db}.{RAW} WHERE ({spans_where(spans)}) AND event_id IN {{ids:Array(String)}} LIMIT 1 BY event_id)"

    @staticmethod
    def _bucketed(minutes: Counter[Key], table: str) -> Counter[Key]:
        """The batch's per-minute counts in `table`'s buckets and key (UTC buckets of whole
        minutes or hours start at a multiple of their width in Unix seconds)."""
        width, dims = BUCKET_S[CHAIN[table][1]], CHAIN[table][2]
        out: Counter[Key] = Counter()
        for (b, *key), n in minutes.items():
            out[(b - b % width, *key) if dims else (b - b % width,)] += n
        return out

    def _state(self, table: str, mine: Counter[Key]) -> str:
        """`table` against the raw table over the batch's buckets (`mine`: its counts in them)."""
        fn, dims = CHAIN[table][1], CHAIN[table][2]
        cols = ", model, provider, app" if dims else ""
        bucket = f"toUnixTimestamp({fn}(ts, 'UTC'))"
        if not mine:  # none of its rows in llm_calls (write.py restores those first): nothing to write them from
            return "holds"
        lo, hi = min(k[0] for k in mine), max(k[0] for k in mine) + BUCKET_S[fn]
        # the raw table's rows (FINAL: an event inserted twice is one row) and the roll-up's
        # requests over the same buckets; integer literals of our own making
        raw = self._counts(
            f"SELECT {bucket} AS b{cols}, count() FROM {self.db}.{RAW} FINAL "
            f"WHERE ts >= toDateTime64({lo}, 3, 'UTC') AND ts < toDateTime64({hi}, 3, 'UTC') GROUP BY b{cols}"
        )
        have = self._counts(
            f"SELECT toUnixTimestamp(bucket) AS b{cols}, countMerge(requests) FROM {self.db}.{table} "
            f"WHERE bucket >= toDateTime({lo}, 'UTC') AND bucket < toDateTime({hi}, 'UTC') GROUP BY b{cols}"
        )
        short = {k: raw.get(k, 0) - have.get(k, 0) for k in mine}
        if all(v == 0 for v in short.values()):
            return "holds"
        if short == mine:
            return "lacks"
        return "mismatch"

    def _counts(self, sql: str, ids: list[str] | None = None) -> Counter[Key]:
        res = self.client.query(sql, parameters={"ids": ids} if ids is not None else None)
        return Counter({tuple(r[:-1]): int(r[-1]) for r in res.result_rows})

    # -- the repair ----------------------------------------------------------------------------
    def _downstream(self, table: str) -> list[str]:
        below = [t for t, (src, _, _) in CHAIN.items() if src == table]
        return below + [d for t in below for d in self._downstream(t)]

    def _select(self, table: str, batch: str) -> str:
        """`table`'s view SELECT over the batch's rows, through the views above it."""
        src = CHAIN[table][0]
        source = batch if src == RAW else f"({self._select(src, batch)})"
        return rollup_view_query(self.cfg, table, source)

    def _write_again(self, table: str, batch: str, ids: list[str], token: str) -> None:
        select = self._select(table, batch)
        # INSERT ... SELECT matches columns by position: name them as the SELECT does
        names = [str(r[0]) for r in self.client.query(f"DESCRIBE ({select})", parameters={"ids": ids}).result_rows]
        # a fresh token: the check runs before each attempt, so a retry after an INSERT that
        # landed finds the block and writes nothing; one killed in the same gap is written again
        settings = {**INSERT_SETTINGS, "insert_deduplication_token": f"{token}|rollup|{table}|{uuid.uuid4().hex}"}
        self.client.command(
            f"INSERT INTO {self.db}.{table} ({', '.join(names)}) {select}", parameters={"ids": ids}, settings=settings
        )
