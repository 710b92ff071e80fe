"""Stage 2 in memory (no Kafka): the partials messages, the finalizer's per-window state,
its restore (this version's and the previous version's), and dimension sets per window size."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from llmpulse.config import ConfigError, load_settings
from llmpulse.schemas import CallEvent
from llmpulse.schemas.aggregate_wire import encode_aggregate
from llmpulse.schemas.partials import (
    MAX_SETS_PER_MESSAGE,
    CloseMark,
    DimensionSetState,
    ReceivedPartials,
    WindowPartials,
    decode_partials,
    decode_received,
    decode_sets,
    encode_partials,
    window_messages,
)
from llmpulse.streams import state_keys as SK
from llmpulse.streams.finalizing import Pending, StoredFinalizer
from llmpulse.streams.rules.hook import RulesRuntime
from llmpulse.streams.window_stage import call_dimensions
from llmpulse.streams.windowing import Partial, PartitionWindows

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T0_MS = int(T0.timestamp() * 1000)
SOURCES = {"calls": ["calls:0", "calls:1"]}


class CountingTable(dict[str, Any]):
    """A dict that counts writes and deletes, as the Faust table would send changelog records."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def __setitem__(self, key: str, value: Any) -> None:
        self.writes += 1
        # stored as the changelog stores it: JSON
        super().__setitem__(key, json.loads(json.dumps(value)))

    def __delitem__(self, key: str) -> None:
        self.writes += 1
        super().__delitem__(key)


def call(sec: float, user: str = "u", model: str = "m1") -> CallEvent:
    return CallEvent(ts=T0 + timedelta(seconds=sec), model=model, user=user, latency_ms=100.0, prompt_tokens=3)


def closed_window_messages(source: str, events: Iterable[CallEvent], dims: Any = None) -> list[WindowPartials | CloseMark]:
    """What stage 1 sends for one source: a message per window (and chunk), then its close mark."""
    w = PartitionWindows("calls", source, [10, 60], 0.0, 5.0, dims or [[], ["model"], ["user"]])
    w.apply(list(enumerate(events)), now_wall=0)
    res = w.close(now_wall=0, force=True)
    by_window: dict[tuple[int, int], list[DimensionSetState]] = {}
    for p in res.partials:
        by_window.setdefault((p.window_s, p.start_ms), []).append(DimensionSetState(p.dims_key, p.dims, p.state))
    out: list[WindowPartials | CloseMark] = []
    for (s, t), sets in by_window.items():
        out += window_messages("calls", s, t, source, sets)
    assert res.mark_ms is not None
    out.append(CloseMark("calls", source, res.mark_ms))
    return out


def run(stored: StoredFinalizer, msgs: list[WindowPartials | CloseMark], first_offset: int = 0) -> list[Any]:
    """One batch through a stored finalizer, the wire format included; the aggregates published."""
    for m in msgs:
        stored.apply(decode_received(encode_partials(m)))  # as stage 2 receives it
    stored.commit(first_offset + len(msgs) - 1)
    published = stored.publishable()
    stored.published()
    stored.expire()
    return published


def totals(aggs: list[Any]) -> dict[tuple[int, int, str], tuple[int, int]]:
    return {(a.window_s, int(a.window_start.timestamp() * 1000), a.dims_key): (a.requests, a.revision) for a in aggs}


# -- the wire format ------------------------------------------------------------------------------
def test_messages_round_trip_and_previous_version_partials_still_parse() -> None:
    msg = WindowPartials(kind="calls", window_s=10, start_ms=T0_MS, source="calls:0", chunk=1, chunks=2,
                         sets=[DimensionSetState("model=a", {"model": "a"}, {"r": 1})])  # fmt: skip
    assert decode_partials(encode_partials(msg)) == msg
    mark = CloseMark("calls", "calls:1", None)
    assert decode_partials(encode_partials(mark)) == mark
    # exactly what the previous version's Partial.to_json sent
    old = {"type": "partial", "kind": "calls", "s": 60, "t": T0_MS, "dims": {"app": "x"}, "dk": "app=x",
           "src": "calls:2", "state": {"r": 4}}  # fmt: skip
    up = decode_partials(json.dumps(old).encode())
    assert isinstance(up, WindowPartials)
    assert (up.kind, up.window_s, up.start_ms, up.source, up.chunk) == ("calls", 60, T0_MS, "calls:2", -1)
    assert up.sets == [DimensionSetState("app=x", {"app": "x"}, {"r": 4})]
    old_mark = {"type": "mark", "kind": "calls", "src": "calls:0", "mark": 5}
    assert decode_partials(json.dumps(old_mark).encode()) == CloseMark("calls", "calls:0", 5)
    for bad in (b"not json", b'{"type": "other"}', b'{"type": "partials", "kind": "calls"}'):
        with pytest.raises(ValueError):
            decode_partials(bad)
        with pytest.raises(ValueError):
            decode_received(bad)
    # stage 2 leaves each state as its JSON text until its window is published
    received = decode_received(encode_partials(msg))
    assert isinstance(received, ReceivedPartials)
    assert [(e.dims_key, e.dims, json.loads(bytes(e.state))) for e in received.sets] == [("model=a", {"model": "a"}, {"r": 1})]
    assert decode_received(json.dumps(old).encode()) == up
    assert decode_received(encode_partials(mark)) == mark


def test_states_decoded_on_receipt_or_when_published_give_the_same_bytes() -> None:
    """A message decoded whole (its states dicts: a previous version's partial, `flush`) or as
    stage 2 decodes it (states kept as their text): the same aggregates, to the byte."""
    events = [call(i * 0.7, user=f"u{i % 4}") for i in range(40)]
    msgs = closed_window_messages("calls:0", events[::2]) + closed_window_messages("calls:1", events[1::2])
    published = []
    for decode in (decode_partials, decode_received):
        stored = StoredFinalizer.restore(0, SOURCES, CountingTable())
        for m in msgs:
            stored.apply(decode(encode_partials(m)))
        stored.commit(len(msgs))
        published.append([encode_aggregate(a) for a in stored.publishable()])
    assert published[0] and published[0] == published[1]


def test_the_sources_parts_merge_in_one_order_whatever_order_they_arrive_in() -> None:
    """Which source partition's partials reach stage 2 first is timing; the aggregates are not:
    the same bytes either way (the error types' order here; with three parts or more, a float
    sum's last bit too: (a + b) + c is not always (a + c) + b)."""
    ev0 = [CallEvent(ts=T0 + timedelta(seconds=i), model="m1", latency_ms=0.1 * i, error_type="a", status_code=500)
           for i in range(3)]  # fmt: skip
    ev1 = [CallEvent(ts=T0 + timedelta(seconds=i + 0.5), model="m2", latency_ms=0.7 * i, error_type="b", status_code=500)
           for i in range(3)]  # fmt: skip
    msgs0 = closed_window_messages("calls:0", ev0)
    msgs1 = closed_window_messages("calls:1", ev1)
    published = []
    for msgs in (msgs0 + msgs1, msgs1 + msgs0):
        stored = StoredFinalizer.restore(0, SOURCES, CountingTable())
        published.append(sorted(encode_aggregate(a) for a in run(stored, msgs)))
    assert published[0] and published[0] == published[1]
    # in the order of the sources' names: calls:0's error type first
    both = [json.loads(b) for b in published[0] if b'"dims_key":"*"' in b and b'"window_s":10,' in b]
    assert [list(a["errors_by_type"]) for a in both] == [["a", "b"]]


def test_a_part_sent_again_is_a_revision_only_when_its_values_changed() -> None:
    table = CountingTable()
    stored = StoredFinalizer.restore(0, SOURCES, table)
    first = closed_window_messages("calls:0", [call(1), call(2)])
    assert totals(run(stored, first + closed_window_messages("calls:1", [call(3)])))[(10, T0_MS, "*")] == (3, 1)
    # the same states written otherwise (keys in another order, as after a restore of stage 1)
    def reversed_keys(m: WindowPartials | CloseMark) -> WindowPartials | CloseMark:
        if isinstance(m, CloseMark):
            return m
        sets = [DimensionSetState(e.dims_key, e.dims, dict(reversed(e.state.items()))) for e in m.sets]
        return msgspec.structs.replace(m, sets=sets)

    reordered = [reversed_keys(m) for m in first]
    assert encode_partials(reordered[0]) != encode_partials(first[0])
    assert run(stored, reordered, first_offset=10) == []
    # one more event in the window: published again, revision 2
    again = totals(run(stored, closed_window_messages("calls:0", [call(1), call(2), call(5)]), first_offset=20))
    assert again[(10, T0_MS, "*")] == (4, 2)


def test_a_window_of_many_dimension_sets_goes_in_chunks_in_order() -> None:
    sets = [DimensionSetState(f"user=u{i:05d}", {"user": f"u{i:05d}"}, {"r": i}) for i in range(2 * MAX_SETS_PER_MESSAGE + 5)]
    msgs = window_messages("calls", 60, T0_MS, "calls:0", sets)
    assert [(m.chunk, m.chunks, len(m.sets)) for m in msgs] == [
        (0, 3, MAX_SETS_PER_MESSAGE), (1, 3, MAX_SETS_PER_MESSAGE), (2, 3, 5)
    ]
    assert [s for m in msgs for s in m.sets] == sets
    assert len(window_messages("calls", 60, T0_MS, "calls:0", [])) == 1


# -- state per window -----------------------------------------------------------------------------
def test_state_writes_follow_windows_not_dimension_values() -> None:
    def writes(users: int) -> tuple[int, int]:
        table = CountingTable()
        stored = StoredFinalizer.restore(0, SOURCES, table)
        msgs: list[WindowPartials | CloseMark] = []
        for p in range(2):
            msgs += closed_window_messages(f"calls:{p}", [call(i * 0.01, user=f"u{i % users}") for i in range(1000)])
        published = run(stored, msgs)
        return table.writes, len(published)

    few_writes, few_aggs = writes(2)
    many_writes, many_aggs = writes(500)
    assert many_aggs > few_aggs + 500  # hundreds of user windows more...
    assert many_writes == few_writes  # ...for the same state writes


def test_restore_at_any_point_publishes_each_window_once_with_exact_counts() -> None:
    msgs0 = closed_window_messages("calls:0", [call(i * 0.5, user=f"u{i % 7}") for i in range(100)])
    msgs1 = closed_window_messages("calls:1", [call(i * 0.5 + 0.1, user=f"u{i % 5}") for i in range(60)])
    batches = [msgs0, msgs1]
    table = CountingTable()
    stored = StoredFinalizer.restore(0, SOURCES, table)
    got = run(stored, batches[0])
    assert got == []  # calls:1 has not closed anything yet
    # crash and restore between the batches: nothing published twice, nothing lost
    stored = StoredFinalizer.restore(0, SOURCES, table)
    assert stored.fin.applied == len(msgs0) - 1
    got = run(stored, batches[1], first_offset=len(msgs0))
    expected: dict[tuple[int, int, str], int] = {}
    for a in [call(i * 0.5, user=f"u{i % 7}") for i in range(100)] + [call(i * 0.5 + 0.1, user=f"u{i % 5}") for i in range(60)]:
        ms = int(a.ts.timestamp() * 1000)
        for s in (10, 60):
            for dk in ("*", "model=m1", f"user={a.user}"):
                k = (s, ms - ms % (s * 1000), dk)
                expected[k] = expected.get(k, 0) + 1
    assert {k: v[0] for k, v in totals(got).items()} == expected
    assert {v[1] for v in totals(got).values()} == {1}
    # restored again after publishing: nothing to publish, the published windows are known
    stored = StoredFinalizer.restore(0, SOURCES, table)
    assert stored.publishable() == []
    # a source re-sends its windows after a restore of its own: the same states, no re-publication
    assert run(stored, msgs1[:-1], first_offset=200) == []


def test_backfilled_window_is_published_again_after_a_restore_in_between() -> None:
    table = CountingTable()
    stored = StoredFinalizer.restore(0, SOURCES, table)
    first = closed_window_messages("calls:0", [call(1), call(2)])
    other = closed_window_messages("calls:1", [call(3)])
    published = run(stored, first + other)
    assert totals(published)[(10, T0_MS, "*")] == (3, 1)
    # calls:1 is restored and sends window [0, 10) again with one more event (a backfill)
    again = closed_window_messages("calls:1", [call(3), call(4, user="late")])
    for m in again:
        stored.apply(decode_received(encode_partials(m)))  # as stage 2 receives it
    stored.commit(100)
    # crash before publishing: the state knows the window must be published again
    stored = StoredFinalizer.restore(0, SOURCES, table)
    republished = totals(stored.publishable())
    assert republished[(10, T0_MS, "*")] == (4, 2)
    assert republished[(10, T0_MS, "user=late")] == (1, 1)
    assert (10, T0_MS, "user=u") not in republished  # unchanged: not published again


def test_previous_version_state_restores_publishes_and_expires() -> None:
    table = CountingTable()
    # what the previous version wrote: one value per window and dimension set
    for dk, dims, r in (("*", {}, 3), ("model=m1", {"model": "m1"}, 3)):
        acc_state = closed_window_messages("calls:0", [call(i) for i in range(r)])[0]
        assert isinstance(acc_state, WindowPartials)
        st = next(s.state for s in acc_state.sets if s.dims_key == dk)
        table[SK.legacy_pending_key(0, "calls", 10, T0_MS, dk)] = Pending(dims, {"calls:0": st}).to_json()
    table[SK.mark_key(0, "calls", "calls:0")] = T0_MS + 10_000
    table[SK.applied_key(0)] = 41
    stored = StoredFinalizer.restore(0, SOURCES, table)
    assert stored.fin.applied == 41
    assert stored.publishable() == []  # calls:1 has no mark yet
    got = run(stored, [CloseMark("calls", "calls:1", None)], first_offset=42)
    assert totals(got) == {(10, T0_MS, "*"): (3, 1), (10, T0_MS, "model=m1"): (3, 1)}
    # published and restored again: not published twice
    assert StoredFinalizer.restore(0, SOURCES, table).publishable() == []
    # past the backfill retention the old keys go with the window
    far = T0_MS + 3600_000
    run(stored, [CloseMark("calls", "calls:0", far), CloseMark("calls", "calls:1", far)], first_offset=43)
    assert not [k for k in table if SK.parse(k) and SK.parse(k).shape in ("P", "V", "W")]  # type: ignore[union-attr]


def test_window_messages_stored_by_the_previous_format_restore_the_same() -> None:
    """Stored messages were the list their sets decode to; now they are one JSON text each."""
    msgs = closed_window_messages("calls:0", [call(1), call(2, user="v"), call(15)])
    msgs += closed_window_messages("calls:1", [call(3), call(16, user="w")])
    close_1 = msgs.pop()  # calls:1's close mark: nothing is final before it
    new = CountingTable()
    assert run(StoredFinalizer.restore(0, SOURCES, new), msgs) == []
    old = CountingTable()
    for key, value in new.items():
        shape = SK.parse(key)
        old[key] = json.loads(encode_partials_sets(value)) if shape and shape.shape == "W" else value
    assert any(isinstance(v, list) for v in old.values()) and any(isinstance(v, str) for v in new.values())
    got_new = run(StoredFinalizer.restore(0, SOURCES, new), [close_1], first_offset=len(msgs))
    got_old = run(StoredFinalizer.restore(0, SOURCES, old), [close_1], first_offset=len(msgs))
    assert got_new and [a.model_dump() for a in got_new] == [a.model_dump() for a in got_old]


def encode_partials_sets(text: str) -> str:
    """A stored message in the previous format: its sets as a list of [dims_key, dims, state]."""
    return json.dumps([[e.dims_key, e.dims, e.state] for e in decode_sets(text)])


def test_published_parts_are_kept_packed_and_a_backfill_still_merges_them_exactly() -> None:
    table = CountingTable()
    stored = StoredFinalizer.restore(0, SOURCES, table)
    published = run(stored, closed_window_messages("calls:0", [call(1), call(2)]) + closed_window_messages("calls:1", [call(3)]))
    assert totals(published)[(10, T0_MS, "*")] == (3, 1)
    parts = [st for w in stored.fin.windows.values() for p in w.sets.values() for st in p.parts.values()]
    assert parts and all(isinstance(st, bytes) for st in parts)  # kept only for a backfill: packed
    again = run(stored, closed_window_messages("calls:1", [call(3), call(4, user="late")]), first_offset=50)
    assert totals(again)[(10, T0_MS, "*")] == (4, 2)  # a packed part of calls:0 merged with the new one
    assert totals(again)[(10, T0_MS, "user=late")] == (1, 1)
    assert (10, T0_MS, "user=u") not in totals(again)  # neither source changed it: not republished


def test_state_keys_format_and_parse_side_by_side() -> None:
    cases = {
        SK.applied_key(2): SK.StateKey(2, "O"),
        SK.mark_key(2, "calls", "calls:1"): SK.StateKey(2, "M", "calls", source="calls:1"),
        SK.finalized_key(2, "gpu"): SK.StateKey(2, "F", "gpu"),
        SK.chunk_key(2, "calls", 60, T0_MS, "calls:0", 3): SK.StateKey(2, "W", "calls", 60, T0_MS, "calls:0", 3),
        SK.revisions_key(2, "calls", 10, T0_MS): SK.StateKey(2, "V", "calls", 10, T0_MS),
        SK.legacy_pending_key(2, "calls", 10, T0_MS, "app=a|b"): SK.StateKey(2, "P", "calls", 10, T0_MS, dims_key="app=a|b"),
        SK.rule_key(2, "calls", 60, "model=x|y"): SK.StateKey(2, "R", "calls", 60, dims_key="model=x|y"),
    }  # fmt: skip
    for text, key in cases.items():
        assert SK.parse(text) == key
    assert SK.parse("2|calls|A|0|x") is None  # stage 1's keys are not stage 2's


# -- dimension sets per window size ---------------------------------------------------------------
def test_each_window_size_gets_its_own_dimension_sets() -> None:
    w = PartitionWindows("calls", "calls:0", [10, 60], 0.0, 5.0, {10: [[], ["model"]], 60: [[], ["user"], ["model"]]})
    w.apply([(i, call(i, user=f"u{i % 3}")) for i in range(30)], now_wall=0)
    parts: list[Partial] = w.close(now_wall=0, force=True).partials
    assert {p.dims_key for p in parts if p.window_s == 10} == {"*", "model=m1"}
    assert {p.dims_key for p in parts if p.window_s == 60} == {"*", "model=m1", "user=u0", "user=u1", "user=u2"}


def _settings(tmp_path: Any, worker: str, rules: str | None = None) -> Any:
    cfg = tmp_path / "llmpulse.yaml"
    text = f"worker:\n{worker}"
    if rules is not None:
        (tmp_path / "rules.yaml").write_text(rules)
        text += f"rules_file: {tmp_path / 'rules.yaml'}\n"
    cfg.write_text(text)
    return load_settings(cfg, environ={})


def test_default_dimension_sets_follow_what_is_read(tmp_path: Any) -> None:
    s = _settings(tmp_path, "  windows_s: [10, 60]\n")
    dims = call_dimensions(s, RulesRuntime.from_settings(s))
    # the live charts and the LLM metrics' labels at 10 s; all six sets at 60 s (the dashboard, the rules)
    assert dims[10] == [[], ["model"], ["model", "provider", "app"]]
    assert dims[60][:6] == [[], ["model"], ["provider"], ["app"], ["user"], ["api_key_hash"]]
    # a rule judging keys at 10 s brings its set to that size
    rules = "rules:\n  - {name: k, metric: requests, warning: 5, window: 10, by: [api_key_hash]}\n"
    s = _settings(tmp_path, "  windows_s: [10, 60]\n", rules)
    assert ["api_key_hash"] in call_dimensions(s, RulesRuntime.from_settings(s))[10]
    # explicit sizes
    s = _settings(tmp_path, "  windows_s: [10, 60]\n  window_dimensions: {60: [[app]]}\n")
    assert s.worker.dimensions_by_window() == {10: s.worker.dimensions, 60: [["app"]]}


def test_window_dimensions_of_an_unknown_size_or_dimension_stop_start_up(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match=r"window_dimensions.*30 is not a window size"):
        _settings(tmp_path, "  windows_s: [10, 60]\n  window_dimensions: {30: [[]]}\n")
    with pytest.raises(ConfigError, match=r"window_dimensions\.60: unknown dimension 'region'"):
        _settings(tmp_path, "  windows_s: [10, 60]\n  window_dimensions: {60: [[region]]}\n")


def test_a_crash_before_the_aggregates_are_delivered_publishes_them_again() -> None:
    table = CountingTable()
    stored = StoredFinalizer.restore(0, SOURCES, table)
    msgs = closed_window_messages("calls:0", [call(1), call(2)]) + closed_window_messages("calls:1", [call(3)])
    for m in msgs:
        stored.apply(decode_received(encode_partials(m)))  # as stage 2 receives it
    stored.commit(len(msgs) - 1)
    first = totals(stored.publishable())
    assert first[(10, T0_MS, "*")] == (3, 1)
    # the worker dies before the aggregates were delivered (no `published()`)
    stored = StoredFinalizer.restore(0, SOURCES, table)
    assert totals(stored.publishable()) == first  # the same windows, the same revision: same keys
    stored.published()
    assert StoredFinalizer.restore(0, SOURCES, table).publishable() == []


def test_a_window_first_seen_after_the_finalized_mark_passed_it_survives_a_restore() -> None:
    table = CountingTable()
    stored = StoredFinalizer.restore(0, SOURCES, table)
    later = [call(100), call(200)]  # windows far after [0, 10)
    run(stored, closed_window_messages("calls:0", later) + closed_window_messages("calls:1", later))
    assert stored.fin.finalized["calls"] > T0_MS + 10_000
    # calls:1 backfills window [0, 10), never seen before; the worker dies before publishing it
    for m in closed_window_messages("calls:1", [call(1), *later]):
        stored.apply(decode_received(encode_partials(m)))  # as stage 2 receives it
    stored.commit(500)
    stored = StoredFinalizer.restore(0, SOURCES, table)
    got = totals(stored.publishable())
    assert got[(10, T0_MS, "*")] == (1, 1)
    assert got[(60, T0_MS, "*")] == (1, 1)
    assert (60, T0_MS + 60_000, "*") not in got  # [60, 120) is published and unchanged
