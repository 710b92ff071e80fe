"""Stage 1's state records: key formats and parsers side by side, and what a batch writes.

Every key starts with its source partition (the changelog partition it lives in,
changelog_state.py), then the event kind and a one-letter shape:

    <p>|<kind>|M                          meta: applied position, max event time, close mark
    <p>|<kind>|W|<start>|<seq>            accumulators of one window of the smallest size
    <p>|<kind>|L|<start>|<finest tuple>   a late accumulator of a closed window (windowing.py)
    <p>|<kind>|D|<start>|<through>        a chunk of counted event ids (dedup.py)
    <p>|<kind>|A|<start>|<finest tuple>   one accumulator: the previous version's records,
                                          read, never written (deleted with their window)

The finest tuple's members are joined by U+001F, which no dimension value holds. Stage
2's keys (state_keys.py) live in another changelog; kinds hold no `|`.

State is written per window, not per accumulator: a write queues, for each window whose
accumulators changed, one or more W records under the next seqs of that window (counting
up, never reused while the window lives), each a mapping `<finest tuple>` -> that
accumulator's state and the last offset it absorbed, of at most MAX_ACCS accumulators and
MAX_BYTES of text (far below Kafka's 1 MB message limit). On high-cardinality traffic
nearly every event has its own finest tuple: a record per accumulator was a changelog
record (key text, send) and a tombstone per event. A window's state is its W records
applied in seq order (a later record's accumulator replaces an earlier one's), after any
A records of it (older than every W record). Late accumulators (L) and id chunks (D) stay
one record per key: a window's few late accumulators and its id chunks are already few.

What bounds the W records of an open window: a window gets records only in writes that
changed its accumulators, which happen while it is open (later events are late: L
records). Those writes may be many (live traffic writes about every batch), so once the
accumulator states held by its live records exceed twice its accumulators plus
REWRITE_SLACK, the write rewrites the window whole (every accumulator, new seqs) and then
deletes its older records. Its live records thus hold at most about 2 x its accumulators
+ REWRITE_SLACK + one write's states: what a restore reads back stays proportional to the
window's accumulators, as with one record each. A close deletes every record of its
windows (`closed_keys`: each seq from the first live one, and their A keys).

The order of the records of a batch is the guarantee (`write_batch`): its window records
(and the deletion of those a rewrite replaced, after the rewrite), late accumulators and
id chunks first, the meta last. The changelog keeps that order (changelog_state.py), so
a crash leaves the meta of the batch before, with a prefix of this batch's records past
it. A W record past the meta is harmless: each of its accumulators carries the last
offset it absorbed, as an A record did, so restored from it an accumulator skips the
replayed events at or below that offset, and one not in the prefix is restored from an
earlier record as of the meta's batch or later (a rewrite deletes older records only
after its own). An id chunk past the meta's applied position is dropped (`load`). So the
batch replays to exactly the state it had.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from sys import intern
from typing import Any, Literal, NamedTuple, Protocol

from llmpulse.streams.changelog_state import EncodedMapping
from llmpulse.streams.dedup import ChunkKey, chunk_key_parse, chunk_key_text
from llmpulse.streams.windowing import AccKey, CloseResult, PartitionWindows

SEP = "\x1f"
Shape = Literal["M", "W", "L", "D", "A"]
MAX_ACCS = 1000  # accumulators in one W record
MAX_BYTES = 256 * 1024  # and its value's text in bytes: a quarter of Kafka's default message limit
REWRITE_SLACK = 32  # accumulator states a window's records may hold beyond twice its accumulators


class Records(Protocol):
    """Where a batch's records are written (changelog_state.ChangelogState; a dict in tests)."""

    def __setitem__(self, key: str, value: Any) -> None: ...

    def __delitem__(self, key: str) -> None: ...

    def __contains__(self, key: object) -> bool: ...


class WindowStateKey(NamedTuple):
    partition: int
    kind: str
    shape: Shape
    acc: AccKey | None = None  # shapes A and L
    chunk: ChunkKey | None = None  # shape D
    window: tuple[int, int] | None = None  # shape W: (start, seq)


def meta_key(partition: int, kind: str) -> str:
    return f"{partition}|{kind}|M"


def window_key(partition: int, kind: str, start: int, seq: int) -> str:
    return f"{partition}|{kind}|W|{start}|{seq}"


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
        if shape == "W" and rest:
            start, _, seq = rest[0].partition("|")
            return WindowStateKey(partition, kind, "W", window=(int(start), int(seq)))
        if shape in ("A", "L") and rest:
            start, _, tup = rest[0].partition("|")
            return WindowStateKey(partition, kind, shape, acc=(int(start), tuple(tup.split(SEP))))  # type: ignore[arg-type]
        if shape == "D" and rest:
            return WindowStateKey(partition, kind, "D", chunk=chunk_key_parse(rest[0]))
    except ValueError:
        return None
    return None


@dataclass(slots=True)
class WindowRecords:
    """The W records of one open window: seqs `low` .. `next - 1` (those not deleted are live)."""

    low: int = 0
    next: int = 0
    states: int = 0  # accumulator states its live records hold (an accumulator once per record)
    accs: set[tuple[str, ...]] = field(default_factory=set)  # every accumulator they hold
    legacy: list[tuple[str, ...]] = field(default_factory=list)  # its accumulators' live A records


def records_of(pw: PartitionWindows) -> dict[int, WindowRecords]:
    """The partition's W records by window start (kept with its windows, made at the first use)."""
    book: dict[int, WindowRecords] | None = pw.records
    if book is None:
        book = pw.records = {}
    return book


def write_batch(table: Records, partition: int, pw: PartitionWindows) -> None:
    """Queue what changed in the partition's windows since the last write, meta last."""
    kind = pw.kind
    book = records_of(pw)
    changed: defaultdict[int, list[tuple[str, ...]]] = defaultdict(list)  # by window start
    for start, dims in pw.take_dirty():
        changed[start].append(dims)
    for start, tuples in changed.items():
        w = book.get(start)
        if w is None:
            w = book[start] = WindowRecords()
        w.accs.update(tuples)
        w.states += len(tuples)
        if w.states <= 2 * len(w.accs) + REWRITE_SLACK:
            _write_window(table, partition, pw, start, w, tuples)
            continue
        # rewritten whole, then its older records deleted: a crash in between leaves both,
        # and the later seqs replace the earlier ones
        stale = [window_key(partition, kind, start, seq) for seq in range(w.low, w.next)]
        stale += [acc_key(partition, kind, (start, dims)) for dims in w.legacy]
        w.low, w.states, w.legacy = w.next, len(w.accs), []
        _write_window(table, partition, pw, start, w, list(w.accs))
        for stale_key in stale:
            if stale_key in table:
                del table[stale_key]
    for key in pw.take_late_dirty():
        table[late_key(partition, kind, key)] = pw.late_state(key)
    # the ids before the meta: a chunk past the meta's applied position is dropped by `load`
    for chunk, ids in pw.seen.take_added(pw.applied_offset):
        table[ids_key(partition, kind, chunk)] = ids
    table[meta_key(partition, kind)] = pw.meta_state()


def _write_window(
    table: Records,
    partition: int,
    pw: PartitionWindows,
    start: int,
    w: WindowRecords,
    tuples: list[tuple[str, ...]],
) -> None:
    """Queue the accumulators `tuples` of window `start` as W records of its next seqs, each
    bounded by MAX_ACCS and MAX_BYTES (an accumulator larger than that alone in its record)."""
    prefix = f"{partition}|{pw.kind}|W|{start}|"
    acc_state = pw.acc_state_to_encode
    record = EncodedMapping()
    for dims in tuples:
        name, state = SEP.join(dims), acc_state((start, dims))
        if len(record) >= MAX_ACCS or not record.add(name, state, MAX_BYTES):
            table[prefix + str(w.next)] = record
            w.next += 1
            record = EncodedMapping()
            record.add(name, state)
    if record:
        table[prefix + str(w.next)] = record
        w.next += 1


def closed_keys(partition: int, pw: PartitionWindows, res: CloseResult) -> list[str]:
    """The keys a close dropped (written as tombstones once its partials are delivered): every
    record of each window it removed (W and A), its late accumulators and id chunks."""
    kind = pw.kind
    book = records_of(pw)
    out: list[str] = []
    for start in dict.fromkeys(key[0] for key in res.removed):
        w = book.pop(start, None)
        if w is not None:
            out += [window_key(partition, kind, start, seq) for seq in range(w.low, w.next)]
            out += [acc_key(partition, kind, (start, dims)) for dims in w.legacy]
    out += [late_key(partition, kind, r) for r in res.removed_late]
    out += [ids_key(partition, kind, c) for c in res.removed_ids]
    return out


def load(pw: PartitionWindows, partition: int, items: Iterable[tuple[str, Any]]) -> list[str]:
    """Fill `pw` (new, empty) from the partition's stored records of its kind; the keys of
    id chunks a crash left past the meta, to delete (their batch is replayed)."""
    book = records_of(pw)
    windows: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    for key, value in items:
        parsed = parse(key) if isinstance(key, str) and value is not None else None
        if parsed is None or parsed.partition != partition or parsed.kind != pw.kind:
            continue
        if parsed.shape == "M":
            pw.restore_meta(value)
        elif parsed.shape == "W":
            assert parsed.window is not None
            start, seq = parsed.window
            windows.setdefault(start, []).append((seq, value))
        elif parsed.shape == "A":  # the previous version's: older than every W record
            assert parsed.acc is not None
            pw.restore_acc(parsed.acc, value)
            w = book.get(parsed.acc[0])
            if w is None:
                w = book[parsed.acc[0]] = WindowRecords()
            w.accs.add(parsed.acc[1])
            w.legacy.append(parsed.acc[1])
            w.states += 1
        elif parsed.shape == "L":
            assert parsed.acc is not None
            pw.restore_late(parsed.acc, value)
        elif parsed.chunk is not None:
            pw.seen.restore_chunk(parsed.chunk, value)
    for start, records in windows.items():
        records.sort(key=lambda r: r[0])
        w = book.get(start)
        if w is None:
            w = book[start] = WindowRecords()
        w.low, w.next = records[0][0], records[-1][0] + 1
        for _, mapping in records:
            for name, state in mapping.items():
                dims = tuple(map(intern, name.split(SEP)))
                pw.restore_acc((start, dims), state)
                w.accs.add(dims)
            w.states += len(mapping)
    return [
        ids_key(partition, pw.kind, c)
        for c in pw.seen.finish_restore(pw.applied_offset, pw.close_mark_ms)
    ]
