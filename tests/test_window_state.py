"""Stage 1's state on its changelog (llmpulse/streams/window_state.py), without Kafka.

Windows are driven as window_stage.py drives them (apply a batch; the close marks and
tombstones of the previous close, then the batch's state; close; send the queued records
in order) through the real ChangelogState and its JSON records. A restarted partition
reads back what a compacted changelog holds after any prefix of those records (a crash
anywhere in a flush) and replays the batches from the start: the partials it emits, after
those the first run had emitted, must be the ones of a run without a crash.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from llmpulse.schemas import CallEvent
from llmpulse.streams import window_state as WS
from llmpulse.streams.accumulators import ACCUMULATORS
from llmpulse.streams.changelog_state import ChangelogState, EncodedMapping
from llmpulse.streams.windowing import Partial, PartitionWindows
from tests.test_accumulators import random_call, random_feedback, random_gpu, random_host

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DIMS = [[], ["model"], ["user"]]
Batch = list[tuple[int, CallEvent]]
Record = tuple[str, Any]  # (key, JSON value or None for a tombstone)


def call(
    i: int, sec: float, model: str = "m1", user: str = "u1", latency: float | None = None
) -> CallEvent:
    return CallEvent(
        event_id=f"e{i}", ts=T0 + timedelta(seconds=sec), model=model, user=user,
        status_code=500 if i % 4 == 0 else 200, error_type="upstream_5xx" if i % 4 == 0 else None,
        latency_ms=10 + i % 7 if latency is None else latency, ttft_ms=3 + i % 5 if latency is None else latency / 2,
        prompt_tokens=i % 11, completion_tokens=3, cost_usd=0.0001 * (i % 5),
    )  # fmt: skip


def windows() -> PartitionWindows:
    return PartitionWindows(
        "calls", "calls:0", [10, 60], 1.0, 5.0, DIMS, 30.0, allowed_lateness_s=30.0
    )


def batches_of(events: list[CallEvent], sizes: Iterable[int]) -> list[Batch]:
    out: list[Batch] = []
    i = 0
    for n in sizes:
        if i >= len(events):
            break
        out.append([(i + j, e) for j, e in enumerate(events[i : i + n])])
        i += n
    return out


class Changelog:
    """One source partition's stage-1 state, recorded as the records its flushes sent."""

    def __init__(self) -> None:
        self.state = ChangelogState("windows", "w-changelog")
        self.log: list[Record] = []
        self.sizes: dict[str, int] = {}  # the bytes of each key's last value sent

    def flush(self) -> None:
        sent: list[tuple[int | None, bytes | None, bytes | None]] = []

        async def publish(
            topic: str, records: list[tuple[int | None, bytes | None, bytes | None]]
        ) -> list[Any]:
            sent.extend(records)
            return []

        asyncio.run(self.state.flush(publish))
        for partition, key, value in sent:
            assert partition == 0 and key is not None
            self.log.append((json.loads(key), None if value is None else json.loads(value)))
            self.sizes[json.loads(key)] = 0 if value is None else len(value)


def compacted(records: Iterable[Record]) -> dict[str, Any]:
    """What a restore reads back from these records (restore.read_changelog_partition)."""
    out: dict[str, Any] = {}
    for key, value in records:
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def run(w: PartitionWindows, batches: list[Batch], changelog: Changelog | None = None,
        legacy_until: int = 0) -> tuple[list[Partial], list[int]]:  # fmt: skip
    """Drive `w` as window_stage.py does; its partials, and where each batch's flush ends in the log.
    The first `legacy_until` batches are written as the previous version wrote them (A records)."""
    partials: list[Partial] = []
    ends: list[int] = []
    pending: tuple[dict[str, Any] | None, list[str]] | None = None
    for i, batch in enumerate(batches):
        w.apply(batch, now_wall=0)
        if changelog is not None:
            table = changelog.state
            if pending is not None:  # the previous close's partials are delivered
                meta, removed = pending
                if meta is not None:
                    table[WS.meta_key(0, w.kind)] = meta
                for k in removed:
                    if k in table:
                        del table[k]
            if i < legacy_until:
                write_legacy(table, w)
            else:
                WS.write_batch(table, 0, w)
        before = w.close_mark_ms
        res = w.close(now_wall=0)
        partials += res.partials
        if changelog is not None:
            changed = res.partials or res.removed or w.close_mark_ms != before
            pending = (w.meta_state() if changed else None, WS.closed_keys(0, w, res))
            changelog.flush()
            ends.append(len(changelog.log))
    return partials, ends


def write_legacy(table: ChangelogState, w: PartitionWindows) -> None:
    """The previous version's write: one A record per changed accumulator, then as today."""
    for key in w.take_dirty():
        table[WS.acc_key(0, w.kind, key)] = w.acc_state(key)
    for key in w.take_late_dirty():
        table[WS.late_key(0, w.kind, key)] = w.late_state(key)
    for chunk, ids in w.seen.take_added(w.applied_offset):
        table[WS.ids_key(0, w.kind, chunk)] = ids
    table[WS.meta_key(0, w.kind)] = w.meta_state()


def restored(records: Iterable[Record]) -> PartitionWindows:
    w = windows()
    WS.load(w, 0, compacted(records).items())
    return w


def latest(partials: Iterable[Partial]) -> dict[tuple[int, int, str, str], dict[str, Any]]:
    """What the finalizer keeps of a source: its last partial of each window and dimension set."""
    return {(p.window_s, p.start_ms, p.source, p.dims_key): p.state for p in partials}


def crash_everywhere(
    batches: list[Batch], legacy_until: int = 0, steps: Iterable[int] | None = None
) -> int:
    """Restore from every prefix of the given batches' flushes, replay, compare; the prefixes tried."""
    want, _ = run(windows(), batches)
    log = Changelog()
    first, ends = run(windows(), batches, log, legacy_until)
    assert latest(first) == latest(want)
    emitted = [0]
    w = windows()
    for batch in batches:  # the partials emitted through each batch (its close precedes its flush)
        w.apply(batch, now_wall=0)
        emitted.append(emitted[-1] + len(w.close(now_wall=0).partials))
    tried = 0
    for k in range(len(batches)) if steps is None else steps:
        start = ends[k - 1] if k else 0
        for cut in range(start, ends[k] + 1):
            again, _ = run(restored(log.log[:cut]), batches)
            got = latest(first[: emitted[k + 1]] + again)
            assert got == latest(want), (k, cut - start, ends[k] - start, log.log[cut - 1][0])
            tried += 1
    return tried


def sparse_and_late() -> list[CallEvent]:
    """Two models and users over 0 .. 130 s, a few copies, and late events of closed windows."""
    events = [call(i, i * 0.7, model=f"m{i % 2}", user=f"u{i % 3}") for i in range(190)]
    events[120:120] = [
        call(1000 + j, 55.0 + j * 1.5, model="m0") for j in range(6)
    ]  # late, within the lateness
    events[150:150] = [
        call(2000 + j, 1.0 + j, model="m1") for j in range(2)
    ]  # late, past it: dead letters
    events[60:60] = events[10:14]  # copies
    return events


# -- the tests ---------------------------------------------------------------------------------------------
def test_a_state_written_per_window_restores_to_the_same_windows() -> None:
    events = [
        call(i, i * 0.25, model=f"m{i % 3}", user=f"u{i % 40}") for i in range(300)
    ]  # 0 .. 75 s
    batches = batches_of(events, [70, 50, 90, 90])
    want, _ = run(windows(), batches)
    log = Changelog()
    first, _ = run(windows(), batches[:2], log)
    keys = [WS.parse(k) for k, _ in log.log]
    assert all(k is not None for k in keys)
    shapes = {k.shape for k in keys if k is not None}
    assert shapes == {"W", "D", "M"}  # no record per accumulator
    # a W record (the first, of the first batch): finest tuple -> the accumulator's state and
    # the last offset it absorbed, as an A record held it
    w = windows()
    w.apply(batches[0], now_wall=0)
    key, value = next((k, v) for k, v in log.log if k.split("|")[2] == "W")
    parsed = WS.parse(key)
    assert parsed is not None and parsed.window is not None and parsed.window[1] == 0 and value
    for name, state in value.items():
        acc = (parsed.window[0], tuple(name.split(WS.SEP)))
        assert (
            state == json.loads(json.dumps(w.acc_state(acc))) and state["o"] == w.acc_offsets[acc]
        )
    # restored, the remaining batches close to the same partials as a run without a restart
    again, _ = run(restored(log.log), batches)
    assert latest(first + again) == latest(want)
    assert len(log.log) < sum(len(b) for b in batches[:2]) / 4


def test_a_crash_anywhere_in_a_flush_replays_exactly() -> None:
    """Every prefix of every flush, with copies and late events: the W records past the meta
    carry their accumulators' offsets. Among them, the cut after a batch's window records and
    before its meta: the restored accumulators hold the batch's latest event, and its replay
    must still move event time as the first run did (closing the same windows)."""
    batches = batches_of(sparse_and_late(), [23, 40, 17, 31, 9, 44, 30, 6])
    assert crash_everywhere(batches) > 100
    # the batch's latest event closes [0, 10 s); restored past the meta, it is skipped on replay:
    # the next batch's event of [0, 10 s) is still late (its ~late partial), not counted on time
    events = [call(i, i * 1.0, model="m0") for i in range(9)] + [
        call(9, 25.0, model="m1"),
        call(10, 9.5, model="m0"),
    ]
    assert crash_everywhere(batches_of(events, [9, 1, 1])) >= 4


def test_a_window_written_many_times_is_rewritten_whole_and_its_older_records_deleted() -> None:
    """Live traffic writes about every batch: a window's records would grow with its writes.
    Once they hold more than twice its accumulators plus REWRITE_SLACK states, the window is
    rewritten whole and its older records deleted, after the new ones (a crash between them
    replays exactly)."""
    events = [call(i, i * 0.05, model=f"m{i % 2}", user="u1") for i in range(400)]  # 0 .. 20 s
    batches = batches_of(events, [2] * 200)
    log = Changelog()
    w = windows()
    _, ends = run(
        w, batches[:150], log
    )  # window [0, 10 s): 200 events, 2 accumulators, ~100 writes
    prefix = f"0|calls|W|{int(T0.timestamp() * 1000)}|"
    live_w = [k for k in log.state.live if k.startswith(prefix)]
    records = WS.records_of(w)[int(T0.timestamp() * 1000)]
    assert records.next > 2 + WS.REWRITE_SLACK  # written more often than the bound
    assert len(live_w) <= 2 * 2 + WS.REWRITE_SLACK  # but not more records live than it
    deleted = [k for k, v in log.log if v is None and k.startswith(prefix)]
    assert deleted, "no rewrite deleted the window's older records"
    # a crash in a flush that rewrote a window replays exactly
    rewrites = [
        i for i, (key, value) in enumerate(log.log) if value is None and key.startswith(prefix)
    ]
    steps = sorted({next(k for k, end in enumerate(ends) if end > i) for i in rewrites[:1]})
    assert crash_everywhere(batches[:150], steps=steps) > 3


def test_more_accumulators_than_a_record_holds_split_into_records_that_restore_whole() -> None:
    # 1,500 users in one window: more accumulators than MAX_ACCS
    many = [call(i, 1 + i * 0.004, user=f"u{i}") for i in range(1500)]
    # 900 users with varied latencies each: their states exceed MAX_BYTES before MAX_ACCS
    big = [call(10_000 + i, 12 + i * 0.0006, user=f"v{i % 900}", latency=1 + (i * 37) % 5000)
           for i in range(12_000)]  # fmt: skip
    events = many + big + [call(99_999, 80.0)]  # the last one closes both windows
    batches = batches_of(events, [len(many), len(big), 1])
    log = Changelog()
    first, _ = run(windows(), batches[:2], log)
    by_window: dict[int, list[Any]] = {}
    for key, value in log.log:
        parsed = WS.parse(key)
        if parsed is not None and parsed.window is not None:
            by_window.setdefault(parsed.window[0], []).append((parsed.window[1], value))
    t0 = int(T0.timestamp() * 1000)
    for start, accs in ((t0, 1500), (t0 + 10_000, 900)):
        recs = by_window[start]
        assert [seq for seq, _ in recs] == list(range(len(recs))) and len(recs) >= 2
        assert sum(len(v) for _, v in recs) == accs
        for seq, v in recs:
            assert len(v) <= WS.MAX_ACCS and log.sizes[WS.window_key(0, "calls", start, seq)] <= WS.MAX_BYTES
    want, _ = run(windows(), batches)
    again, _ = run(restored(log.log), batches)
    assert latest(first + again) == latest(want)


def test_an_encoded_mapping_is_sent_as_the_json_of_its_items_and_knows_its_size() -> None:
    items = {
        "a\x1fb": {"o": 3, "a": {"x": [1.5, None], "b": {7: 2}, "s": 0.1 + 0.2, "big": 1e300}},
        "é": {"o": 4, "a": {}},
        "c": {"o": 5, "a": {"n": 1}},
    }
    m = EncodedMapping()
    assert m.text() == b"{}" and m.size == 2 and len(m) == 0
    for name, value in items.items():
        assert m.add(name, value)
        assert m.size == len(m.text())
    # what json.dumps of it reads back as (int keys become strings), in as many bytes as counted
    assert json.loads(m.text()) == json.loads(json.dumps(items))
    assert m.size == len(m.text()) and len(m) == 3
    # an item past the limit is not added, and the text is left as it was; a first item always is
    before = m.text()
    assert not m.add("d", {"o": 6, "a": {"big": "x" * 100}}, limit=m.size + 20)
    assert m.text() == before and m.size == len(before) and len(m) == 3
    assert m.add("d", {"o": 6}, limit=m.size + len(b',"d":{"o":6}'))  # exactly at the limit
    one = EncodedMapping()
    assert one.add("d", {"o": 6, "a": {"big": "x" * 100}}, limit=10) and len(one) == 1


def test_an_accumulators_record_text_is_the_text_of_its_state() -> None:
    """A W record holds each accumulator as `acc_state_to_encode` (structs sharing its dicts):
    the very text of `acc_state` encoded, so the records are the bytes the dicts made, for
    accumulators made by events, merged, and restored from states of any version."""
    rnd = random.Random(13)
    for kind, make in (("calls", random_call), ("gpu", random_gpu), ("feedback", random_feedback), ("host", random_host)):
        cls = ACCUMULATORS[kind]
        for i in range(200):
            acc: Any = cls()
            for _ in range(rnd.choice([1, 1, 2, 7, 40])):
                acc.agg(make(rnd))
            state = acc.to_state()
            if kind == "calls" and i % 3 == 0:
                del state["tf"]  # a state written before the TTFT sum was kept
                state["ls"] = round(state["ls"])  # a sum that JSON read back as an int
            for a in (acc, cls.from_state(json.loads(json.dumps(state))), cls.merged([acc, acc])):
                m = EncodedMapping()
                m.add("k", a.state_to_encode())
                assert m.text() == msgspec.json.encode({"k": a.to_state()})
    w = windows()
    w.apply([(i, call(i, i * 0.5, user=f"u{i % 3}")) for i in range(40)], 0.0)
    for key in w.accs:
        assert msgspec.json.encode(w.acc_state_to_encode(key)) == msgspec.json.encode(w.acc_state(key))


def test_a_state_of_the_previous_version_restores_and_its_records_are_deleted_with_their_windows() -> (
    None
):
    """A state written as one A record per accumulator (before this format) restores unchanged;
    the windows it holds are written as W records from then on, and every A and W key of a
    window is deleted when it closes. A crash anywhere after the upgrade replays exactly."""
    end = (
        [call(10_000, 400.0)],
        [call(10_001, 400.5)],
    )  # close everything before 340 s; then deliver
    events = sparse_and_late()
    batches = batches_of(events, [23, 40, 17, 31, 9, 44, 30, 6]) + [
        [(10_000 + j, *e)] for j, e in enumerate(end)
    ]
    want, _ = run(windows(), batches)
    log = Changelog()
    first, _ = run(windows(), batches[:2], log, legacy_until=2)  # the previous version, then a stop
    assert {k.split("|")[2] for k, _ in log.log} == {"A", "D", "M"}
    w = restored(log.log)
    log.state.restore(0, compacted(log.log))
    # the new version continues: replays from the start (skipped by offset), writes W records
    again, _ = run(w, batches, log)
    assert latest(first + again) == latest(want)
    left = [WS.parse(k) for k in compacted(log.log)]
    assert not [p for p in left if p is not None and p.shape == "A"]
    t360 = int((T0 + timedelta(seconds=360)).timestamp() * 1000)
    assert [p for p in left if p is not None and p.shape == "W"]
    assert all(p.window[0] >= t360 for p in left if p is not None and p.window is not None)
    # a crash anywhere in the flushes around the upgrade
    assert crash_everywhere(batches, legacy_until=3, steps=[2, 3, 4]) > 20


def test_accumulators_restored_past_their_close_are_dropped_at_the_next_close() -> None:
    """A crash after a close's mark was written and before its tombstones: the restored state
    holds accumulators of windows closed already (their partials delivered). The next close
    that moves the mark drops them and deletes their records, though none of their windows closes."""
    batches = batches_of(sparse_and_late(), [23, 40, 17, 31, 9, 44, 30, 6])
    log = Changelog()
    run(windows(), batches, log)
    seen_stale = 0
    for cut in range(len(log.log) + 1):
        w = restored(log.log[:cut])
        mark = w.close_mark_ms
        if mark is None:
            continue
        stale = {k for k in w.accs if k[0] - k[0] % w.max_ms + w.max_ms <= mark}
        seen_stale += bool(stale)
        later = call(500_000 + cut, (mark - int(T0.timestamp() * 1000)) / 1000 + 30, model="m9")
        w.apply([(10**9, later)], now_wall=0)
        res = w.close(now_wall=0)
        assert stale <= set(res.removed) and not stale & set(w.accs)
        gone = set(WS.closed_keys(0, w, res))
        assert all(k in gone for k in compacted(log.log[:cut]) if (p := WS.parse(k)) and p.window
                   and p.window[0] - p.window[0] % w.max_ms + w.max_ms <= mark)  # fmt: skip
    assert seen_stale
