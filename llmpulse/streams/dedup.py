"""Every event counted once by its event_id, within a partition's open and recently closed windows.

Kafka delivers at least once, and producers do resend: a proxy replays its spool after
a broker stall, librdkafka retries a produce whose acknowledgement was lost, an ingest
client retries after a 503. The copy arrives at a new offset, which the offset-based
exactness of windowing.py takes for a new event. So each source partition remembers
the ids it counted, per window of the smallest size (a copy has the same `ts`, so it
falls in the same window): a set of 64-bit hashes while the window is open, an array of
them (8 bytes an id, sorted when first searched) once it has closed, forgotten `horizon_ms` of event time
after the partition's close mark passed the window's end. A copy found there is dropped
and counted (`llmpulse_worker_duplicates_total`); past the horizon it is reported late
like any other event of a closed window. A late event counted in a revision of its closed
window (windowing.py, allowed lateness <= the horizon) adds its id to that window, so its
copy is a duplicate too. Memory is bounded by the events of the open windows and of the
horizon.

The hash is Python's own of the id string: 64-bit SipHash under a per-process random
key, computed once per string, so ids cannot be chosen from outside to collide. What is
persisted are the ids themselves (one chunk per window and batch, in the window state's
changelog), hashed again on restore.

Restart exactness: a chunk records the position through which its batch was applied and
is written before the partition's meta record. On restore, a chunk past the meta's
applied position belongs to a batch whose meta never reached the changelog: it is
dropped (and deleted), its events are replayed and their ids added again. The ids held
therefore always match the position the replay resumes from, and an event replayed after
a crash is never taken for a copy of itself.

Only within a partition: producers key calls by model (feedback by the call judged, GPU
samples by host), so a copy reaches the partition of its original. A producer that keys
a copy differently (no key, a random key) sends it to another partition, where it is
counted again in the windows; the raw tables still hold it once (docs/deployment.md).
"""

from __future__ import annotations

from array import array
from bisect import bisect_left

ID_SEP = " "  # event ids match ^[A-Za-z0-9_.:-]+$: a space never occurs in one
ChunkKey = tuple[int, int]  # window start (ms), position through which its batch applied


def chunk_key_text(key: ChunkKey) -> str:
    return f"{key[0]}|{key[1]}"


def chunk_key_parse(text: str) -> ChunkKey:
    start, _, through = text.partition("|")
    return int(start), int(through)


class SeenIds:
    """The event ids one source partition counted, by window start (ms) of the smallest window."""

    __slots__ = ("added", "base_ms", "chunks", "closed", "horizon_ms", "late", "open", "restoring", "unsorted")

    def __init__(self, base_ms: int, horizon_ms: int) -> None:
        self.base_ms = base_ms
        self.horizon_ms = horizon_ms
        self.open: dict[int, set[int]] = {}  # windows not closed yet: read and written per event
        # closed within the horizon; most are never searched, so an array is sorted (for
        # bisection) only when first searched: closing costs a copy, not a sort
        self.closed: dict[int, array[int]] = {}
        self.unsorted: set[int] = set()
        self.late: dict[int, set[int]] = {}  # ids of late events counted in closed windows (rare)
        self.added: dict[int, list[str]] = {}  # ids counted since the last take_added (not persisted yet)
        self.chunks: dict[int, list[int]] = {}  # the persisted chunks of each window (their `through`)
        self.restoring: dict[ChunkKey, str] = {}

    # -- the hot path (PartitionWindows.apply inlines `open`/`added` access) ---------------------
    def open_window(self, start: int) -> tuple[set[int], list[str]]:
        ids = self.open.get(start)
        if ids is None:
            ids = self.open[start] = set()
        added = self.added.get(start)
        if added is None:
            added = self.added[start] = []
        return ids, added

    def seen_closed(self, start: int, h: int) -> bool:
        """Whether hash `h` was counted in the closed window `start` (False past the horizon)."""
        arr = self.closed.get(start)
        if arr is not None:
            if start in self.unsorted:
                arr = self.closed[start] = array("q", sorted(arr))
                self.unsorted.discard(start)
            i = bisect_left(arr, h)
            if i < len(arr) and arr[i] == h:
                return True
        else:
            ids = self.open.get(start)
            if ids is not None and h in ids:
                return True
        late = self.late.get(start)
        return late is not None and h in late

    def add_late(self, start: int, h: int, event_id: str) -> None:
        """Record a late event counted in the closed window `start` (persisted like the others)."""
        self.late.setdefault(start, set()).add(h)
        self.added.setdefault(start, []).append(event_id)

    # -- persistence -------------------------------------------------------------------------------
    def take_added(self, through: int) -> list[tuple[ChunkKey, str]]:
        """Chunks to persist for the ids counted since the last call, applied through `through`."""
        out = []
        for start, ids in self.added.items():
            if ids:
                out.append(((start, through), ID_SEP.join(ids)))
                self.chunks.setdefault(start, []).append(through)
        self.added.clear()
        return out

    def restore_chunk(self, key: ChunkKey, text: str) -> None:
        self.restoring[key] = text

    def finish_restore(self, applied: int, mark_ms: int | None) -> list[ChunkKey]:
        """Build the sets from the restored chunks; the chunks to delete (past `applied`, or expired)."""
        dropped: list[ChunkKey] = []
        by_start: dict[int, set[int]] = {}
        for (start, through), text in sorted(self.restoring.items()):
            if through > applied:
                dropped.append((start, through))  # its batch's meta was never written: replayed
                continue
            by_start.setdefault(start, set()).update(hash(i) for i in text.split(ID_SEP))
            self.chunks.setdefault(start, []).append(through)
        self.restoring = {}
        for start, ids in by_start.items():
            self.open.setdefault(start, set()).update(ids)
        if mark_ms is not None:
            dropped += self.close_through(mark_ms)
        return dropped

    # -- closing -----------------------------------------------------------------------------------
    def close_through(self, mark_ms: int) -> list[ChunkKey]:
        """Freeze the windows the close mark passed; forget those past the horizon (their chunks)."""
        base = self.base_ms
        for start in [s for s in self.open if s + base <= mark_ms]:
            self.closed[start] = array("q", self.open.pop(start))
            self.unsorted.add(start)
        expired: list[ChunkKey] = []
        horizon_mark = mark_ms - self.horizon_ms
        for start in [s for s in self.closed.keys() | self.late.keys() if s + base <= horizon_mark]:
            self.closed.pop(start, None)
            self.late.pop(start, None)
            self.unsorted.discard(start)
            self.added.pop(start, None)
            expired += [(start, t) for t in self.chunks.pop(start, [])]
        return expired

    def __len__(self) -> int:
        """How many ids are held (open and closed windows)."""
        return sum(map(len, self.open.values())) + sum(map(len, self.closed.values())) + sum(map(len, self.late.values()))
