"""Roll-ups count each event once: which rows of a batch a table with roll-ups gets.

Producers send an event again, with the same event id, at a new Kafka offset: the ingest
client's retry, an SDK resend, the proxy's spool replayed after a broker outage. The raw
table is a ReplacingMergeTree keyed by id and shows it once (FINAL, or after merges), but
its materialized views add up every row an INSERT carries: each copy would be counted
again in every roll-up. So a batch of a table with roll-ups (`spec.rolled_up`) writes:
- the first copy of each id in the batch's order (later copies are left out; ids are
  `spec.id_column` strings of event objects, as the Arrow items of `llm_calls`);
- none of the ids the table already holds (`BatchWriter.present_ids`: one lookup per
  batch, bounded by the events' time range), nor those that a recorded batch still being
  rebuilt holds (`Batch.pending`: that batch's rows are fixed, it writes them).

Deterministic under rebuilds. The ids left out for the table's or a rebuild's sake
(`Batch.skipped`) are chosen once, in the INSERT thread after the previous batch was
written, and recorded in the batch's intent (`sink_intents.skipped_ids`) before its INSERT;
a retry in the same process writes the rows chosen at its first attempt. A successor
rebuilding the batch leaves out exactly the recorded ids and the later copies (the same
rule on the same messages), and never asks the table again: the batch's own rows may be
there already, and then the tables and roll-ups that hold its block skip it by its token,
while those that missed it get the very rows the others got.

A batch recorded without deduplication (before migration 8, or a table without roll-ups:
`skipped` None) is rebuilt as it was first written, every row.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import Any

from llmpulse.sinks.clickhouse.rows import TableSpec
from llmpulse.sinks.clickhouse.steps.model import Batch

PresentIds = Callable[[TableSpec, list[Any]], set[str]]


def first_copies(items: list[Any], col: str) -> list[Any]:
    """The items, each id once: its first copy in this order."""
    ids = list(map(attrgetter(col), items))
    if len(set(ids)) == len(ids):
        return items
    seen: set[str] = set()
    out = []
    for i, e in zip(ids, items, strict=True):
        if i not in seen:
            seen.add(i)
            out.append(e)
    return out


def rows_to_write(batch: Batch, present_ids: PresentIds) -> list[Any]:
    """The rows the batch's INSERT writes, chosen at the first call and kept in `batch.rows`.

    For a new batch of a table with roll-ups this asks the table which ids it holds and
    sets `batch.skipped`, to be recorded in the intent before the INSERT."""
    if batch.rows is not None:
        return batch.rows
    spec = batch.spec
    if not spec.rolled_up or (batch.rebuilt and batch.skipped is None):
        batch.rows = batch.items
        return batch.rows
    col = spec.id_column
    get = attrgetter(col)
    firsts = first_copies(batch.items, col)
    if not batch.rebuilt:
        pending = {i for i in map(get, firsts) if i in batch.pending} if batch.pending else set()
        ask = [e for e in firsts if get(e) not in pending] if pending else firsts
        batch.skipped = frozenset(present_ids(spec, ask) | pending)
    skip = batch.skipped or frozenset()
    batch.rows = [e for e in firsts if get(e) not in skip] if skip else firsts
    return batch.rows


def missing_rows(batch: Batch, present_ids: PresentIds) -> list[Any]:
    """A part of a recorded batch that nobody can rebuild whole (`only_missing`): the first
    copy of each event the table lacks now (asked again at every attempt: a retry after an
    INSERT that landed writes nothing)."""
    get = attrgetter(batch.spec.id_column)
    firsts = first_copies(batch.items, batch.spec.id_column)
    have = present_ids(batch.spec, firsts)
    return [e for e in firsts if get(e) not in have]
