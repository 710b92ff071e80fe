"""Stage 1's state records: key formats and parsers side by side, and what a batch writes.

Every key starts with its source partition (the changelog partition it lives in,
changelog_state.py), then the event kind and a one-letter shape:

    <p>|<kind>|M                          meta: applied position, max event time, close mark
    <p>|<kind>|A|<start>|<finest tuple>   an accumulator of the smallest window (offset + state)
    <p>|<kind>|L|<start>|<finest tuple>   a late accumulator of a closed window (windowing.py)
    <p>|<kind>|D|<start>|<through>        a chunk of counted event ids (dedup.py)

The finest tuple's members are joined by U+001F, which no dimension value holds. Stage
2's keys (state_keys.py) live in another changelog; kinds hold no `|`.

The order of the records of a batch is the guarantee (`write_batch`): its accumulators,
late accumulators and id chunks first, the meta last. The changelog keeps that order
(changelog_state.py), so a crash leaves the meta of the batch before, with some of this
batch's records past it: restored, an accumulator remembers the last offset it absorbed
(replayed events below it are skipped) and an id chunk past the meta's applied position
is dropped (`load`), so the batch replays to exactly the state it had.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, NamedTuple, Protocol

from llmpulse.streams.dedup import ChunkKey, chunk_key_parse, chunk_key_text
from llmpulse.streams.windowing import AccKey, PartitionWindows

SEP = "\x1f"
Shape = Literal["M", "A", "L", "D"]


class Records(Protocol):
    """Where a batch's records are written (changelog_state.ChangelogState; a dict in tests)."""

    def __setitem__(self, key: str, value: Any) -> None: ...


class WindowStateKey(NamedTuple):
    partition: int
    kind: str
    shape: Shape
    acc: AccKey | None = None  # shapes A and L
    chunk: ChunkKey | None = None  # shape D


def meta_key(partition: int, kind: str) -> str:
    return f"{partition}|{kind}|M"


def acc_key(partition: int, kind: str, key: AccKey) -> str:
    return f"{partition}|{kind}|A|{key[0]}|{SEP.join(key[1])}"


def late_key(partition: int, kind: str, key: AccKey) -> str:
    return f"{partition}|{kind}|L|{key[0]}|{SEP.join(key[1])}"


def ids_key(partition: int, kind: str, chunk: ChunkKey) -> str:
    return f"{partition}|{kind}|D|{chunk_key_text(chunk)}"


def parse(key: str) -> WindowStateKey | None:
    """The parts of a stage-1 key; None for anything else (a barrier, another shape)."""
    try:
        head, kind, shape, *rest = key.split("|", 3)
        partition = int(head)
        if shape == "M" and not rest:
            return WindowStateKey(partition, kind, "M")
        if shape in ("A", "L") and rest:
            start, _, tup = rest[0].partition("|")
            return WindowStateKey(partition, kind, shape, acc=(int(start), tuple(tup.split(SEP))))  # type: ignore[arg-type]
        if shape == "D" and rest:
            return WindowStateKey(partition, kind, "D", chunk=chunk_key_parse(rest[0]))
    except ValueError:
        return None
    return None


def write_batch(table: Records, partition: int, pw: PartitionWindows) -> None:
    """Queue what changed in the partition's windows since the last write, meta last."""
    kind = pw.kind
    for key in pw.take_dirty():
        table[acc_key(partition, kind, key)] = pw.acc_state(key)
    for key in pw.take_late_dirty():
        table[late_key(partition, kind, key)] = pw.late_state(key)
    # the ids before the meta: a chunk past the meta's applied position is dropped by `load`
    for chunk, ids in pw.seen.take_added(pw.applied_offset):
        table[ids_key(partition, kind, chunk)] = ids
    table[meta_key(partition, kind)] = pw.meta_state()


def closed_keys(partition: int, kind: str, removed: Iterable[AccKey], removed_late: Iterable[AccKey],
                removed_ids: Iterable[ChunkKey]) -> list[str]:  # fmt: skip
    """The keys a close dropped (written as tombstones once its partials are delivered)."""
    out = [acc_key(partition, kind, r) for r in removed]
    out += [late_key(partition, kind, r) for r in removed_late]
    out += [ids_key(partition, kind, c) for c in removed_ids]
    return out


def load(pw: PartitionWindows, partition: int, items: Iterable[tuple[str, Any]]) -> list[str]:
    """Fill `pw` (new, empty) from the partition's stored records of its kind; the keys of
    id chunks a crash left past the meta, to delete (their batch is replayed)."""
    for key, value in items:
        parsed = parse(key) if isinstance(key, str) and value is not None else None
        if parsed is None or parsed.partition != partition or parsed.kind != pw.kind:
            continue
        if parsed.shape == "M":
            pw.restore_meta(value)
        elif parsed.shape == "A":
            assert parsed.acc is not None
            pw.restore_acc(parsed.acc, value)
        elif parsed.shape == "L":
            assert parsed.acc is not None
            pw.restore_late(parsed.acc, value)
        elif parsed.chunk is not None:
            pw.seen.restore_chunk(parsed.chunk, value)
    return [
        ids_key(partition, pw.kind, c)
        for c in pw.seen.finish_restore(pw.applied_offset, pw.close_mark_ms)
    ]
