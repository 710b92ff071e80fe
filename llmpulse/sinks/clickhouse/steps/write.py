"""Step 3 of the sink: record the batch's intent, then INSERT it, in the INSERT thread.

Contract:
- submit(batch): starts writing it in the INSERT thread and returns at once; first waits
  (wait_idle) for the batch in flight. One batch in flight at a time: INSERTs of one sink
  never overlap, and batches are written and passed on in the order submitted.
- Writing a batch: for a table with roll-ups, choose its rows (each event id once,
  steps/dedup.py); record its offset ranges, token and the ids left out in `sink_intents`
  (skipped for a rebuilt batch, recorded by the sink that first wrote it), then INSERT
  its rows under the token; a rebuilt batch (a crash came before it) is then checked for rows
  the raw table or a roll-up lost to the crash (rollup_audit.py), and those are written
  again. The rows are chosen once: a retry writes the same rows. A failure (intent or
  INSERT) is counted in llmpulse_sink_insert_failures_total and retried in the thread with exponential backoff, same token, until it succeeds or
  `terminate()` is called: a batch is never dropped.
- While a write is failing, whoever waits for it calls `stall()` (the sink pauses
  fetching and serves its group membership); `release()` once it succeeded.
- poll(): passes a finished batch on to the commit step; never blocks.
- join(): waits for the batch in flight and passes it on: on return every submitted batch
  is written and its offsets committed.
- terminate(): stop retrying (shutdown while ClickHouse is down); the batch in flight is
  neither written nor committed, and is rebuilt from its intent by the next sink.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

from llmpulse import metrics
from llmpulse.sinks.clickhouse.rollup_audit import RollupAudit
from llmpulse.sinks.clickhouse.steps.commit import CommitOffsets
from llmpulse.sinks.clickhouse.steps.dedup import missing_rows, rows_to_write
from llmpulse.sinks.clickhouse.steps.model import Batch
from llmpulse.sinks.clickhouse.writer import BatchWriter

log = logging.getLogger(__name__)


class Abandoned(Exception):
    """The batch was given up (terminate): neither written for sure nor committed."""


class WriteInThread:
    def __init__(
        self,
        writer: BatchWriter,
        next_step: CommitOffsets,
        retry_initial_s: float,
        retry_max_s: float,
        stall: Callable[[], None],
        release: Callable[[], None],
        audit: RollupAudit | None = None,
    ) -> None:
        self.writer = writer
        self.audit = audit
        self.next = next_step
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.stall = stall
        self.release = release
        self.failing = threading.Event()  # the batch in flight has failed at least once
        self._abandon = threading.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sink-insert")
        self._inflight: tuple[Future[None], Batch] | None = None

    def submit(self, batch: Batch) -> None:
        self.wait_idle()
        self._inflight = (self._pool.submit(self._write, batch), batch)

    def poll(self) -> None:
        if self._inflight is None:
            return
        if self._inflight[0].done():
            self._finish()
        elif self.failing.is_set():
            self.stall()  # backpressure: nothing more is fetched while ClickHouse fails

    def wait_idle(self) -> None:
        """Wait for the batch in flight (serving `stall` while it fails) and pass it on."""
        while self._inflight is not None:
            future = self._inflight[0]
            if not self.failing.is_set():
                wait_futures([future], timeout=0.1)
            elif not future.done():
                self.stall()
            if future.done() and self._inflight is not None and self._inflight[0] is future:
                self._finish()

    def join(self) -> None:
        self.wait_idle()

    def terminate(self) -> None:
        self._abandon.set()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _finish(self) -> None:
        assert self._inflight is not None
        future, batch = self._inflight
        self._inflight = None
        failed = self.failing.is_set()
        self.failing.clear()
        try:
            future.result()
        except Abandoned:
            return
        if failed:
            self.release()
        self.next.submit(batch)

    # -- in the INSERT thread ------------------------------------------------------------------
    def _write(self, batch: Batch) -> None:
        delay = self.retry_initial_s
        while True:
            if self._abandon.is_set():
                raise Abandoned(batch.token)
            try:
                self._write_once(batch)
                return
            except Exception as exc:
                metrics.SINK_INSERT_FAILURES.labels(batch.spec.table).inc()
                log.warning("INSERT into %s (%d rows) failed (%s); retrying in %.1f s",
                            batch.spec.table, len(batch.items), exc, delay)  # fmt: skip
                self.failing.set()
                if self._abandon.wait(delay):
                    raise Abandoned(batch.token) from None
                delay = min(self.retry_max_s, delay * 2)

    def _write_once(self, batch: Batch) -> None:
        if batch.only_missing:
            self._write_missing(batch)
            return
        # a table with roll-ups gets each event id once; chosen at the first attempt (steps/dedup.py)
        rows = rows_to_write(batch, self.writer.present_ids)
        if not batch.rebuilt:
            ranges = [(p, a, b) for p, (a, b) in sorted(batch.ranges.items())]
            self.writer.record_intent(batch.spec, batch.topic, batch.token, ranges, len(batch.items), batch.skipped)
        if batch.rebuilt and not batch.spec.rolled_up:
            # nothing sums this table's rows and it replaces a row by its key, so a rebuilt
            # batch is written whole under a token of its own: a copy of rows that landed
            # before the crash is replaced, and a block whose token outlived its rows (see
            # _restore_lost_block) is not skipped. Its items are rows, not event objects:
            # the id lookup of _restore_lost_block does not apply to them.
            self.writer.insert(batch.spec, rows, f"{batch.token}|rebuilt|{uuid.uuid4().hex}")
            return
        self.writer.insert(batch.spec, rows, batch.token)
        if batch.rebuilt:
            self._restore_lost_block(batch, rows)
            if self.audit is not None:
                self.audit.check(rows, batch.token)  # the same gap in a roll-up (rollup_audit.py)

    def _restore_lost_block(self, batch: Batch, rows: list[Any]) -> None:
        """Write the rows of a rebuilt batch that its token kept out although the table lacks them.

        ClickHouse adds a block's token to the table's deduplication log before it commits the
        block's part (MergeTreeSink::commitPart: `deduplication_log->addPart`, then
        `renameTempPartAndAdd`). A sink killed between the two leaves the token without the
        rows, and the rebuilt INSERT under that token is skipped: the batch would be lost for
        good (one 1,000-row batch in 100,000 in a CI run of test_sink_kill). So a rebuilt batch,
        and only it (a crash came before it), is checked after its INSERT, and the rows the
        table lacks are written under a token naming exactly them (a retry of the same rows is
        skipped). The roll-ups get them once: a table's materialized views are fed after its
        own part is committed (an INSERT whose view fails leaves the table's part in place), so
        a block lost from the table reached none of them. Only tables with roll-ups come
        here (their items are event objects with ids and times)."""
        col = batch.spec.id_column
        have = self.writer.present_ids(batch.spec, rows)
        lost = [e for e in rows if str(getattr(e, col)) not in have]
        if not lost:
            return
        metrics.SINK_LOST_BLOCKS.labels(batch.spec.table).inc()
        log.warning("rebuilt batch %s: its token was recorded but %d of its %d rows are not in %s (a writer killed "
                    "between ClickHouse's deduplication log and its part); writing them", batch.token, len(lost),
                    len(rows), batch.spec.table)  # fmt: skip
        self.writer.insert(batch.spec, lost, f"{batch.token}|lost|{ids_digest(lost, col)}")

    def _write_missing(self, batch: Batch) -> None:
        col = batch.spec.id_column
        missing = missing_rows(batch, self.writer.present_ids)
        parts = ",".join(f"{p}:{a}-{b}" for p, (a, b) in sorted(batch.ranges.items()))
        if missing:
            log.warning("rebuilt part %s of batch %s: %d of %d events were not written yet",
                        parts, batch.token, len(missing), len(batch.items))  # fmt: skip
        self.writer.insert(batch.spec, missing, f"{batch.token}|part|{parts}|{ids_digest(missing, col)}")


def ids_digest(items: list[Any], col: str) -> str:
    """A token part naming exactly these events: a retry of the same rows is skipped, other rows are not."""
    return hashlib.sha256("\n".join(str(getattr(e, col)) for e in items).encode()).hexdigest()[:32]
