"""The roll-up of closed windows (llmpulse/streams/rollup.py) against a brute-force reference.

The reference is the plain definition: a window's partial for a group of a dimension set is a
new accumulator into which every finest accumulator of the window whose tuple has the group's
values (none of them "") is merged one by one, in key order. The roll-up derives sets from
others (smaller windows, sets with more members) and must give that state to the bit, dict
order included (float sums depend on the order), whatever the dimension values: many users and
keys, unattributed ("") users and keys, several window sizes, per-size sets, late events,
copies, restores. A window closed again after a restore (its sets of smaller windows no longer
in memory) gives the same partials as the first time.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from llmpulse.schemas import CallEvent
from llmpulse.schemas.aggregate import dimensions_key
from llmpulse.schemas.feedback import Feedback
from llmpulse.streams.accumulators import ACCUMULATORS
from llmpulse.streams.windowing import LATE_SUFFIX, CloseResult, PartitionWindows

T0 = datetime(2026, 1, 1, tzinfo=UTC)
BASE_MS = 5000  # the smallest window of every test: a divisor of theirs
ALL_SETS = [
    [], ["model"], ["provider"], ["app"], ["user"], ["api_key_hash"], ["operation"], ["model", "provider", "app"],
    ["app", "model"], ["app", "user"], ["user", "api_key_hash"], ["model", "operation"], ["provider", "model"],
    ["model", "provider", "app", "user"], ["app", "provider", "model", "user", "api_key_hash"], ["model", "user"],
]  # fmt: skip


def events(rng: random.Random, n: int, rate: float, users: int, keys: int, empty: float) -> list[CallEvent]:
    out = []
    for i in range(n):
        m, k = rng.randrange(7), rng.randrange(keys)
        failed = rng.random() < 0.1
        out.append(CallEvent(
            event_id=f"e{i}", ts=T0 + timedelta(seconds=i / rate + rng.random() * 4), model=f"m{m}",
            provider=f"p{m % 3}", app=f"a{k % 4}", operation=rng.choice(["chat", "chat", "embedding"]),
            user=None if rng.random() < empty else f"u{rng.randrange(users)}",
            api_key_hash=None if rng.random() < empty else f"k{k}",
            status_code=500 if failed else 200, error_type=rng.choice(["x", "y", None]) if failed else None,
            latency_ms=rng.choice([0.0, rng.lognormvariate(6.0, 1.5), rng.random() * 1e4]),
            ttft_ms=None if rng.random() < 0.5 else rng.random() * 300, prompt_tokens=rng.randrange(2000),
            completion_tokens=rng.randrange(800), cost_usd=None if rng.random() < 0.1 else rng.random() * 0.01,
        ))  # fmt: skip
    # out of order (late events), and copies at new offsets
    for _ in range(n // 8):
        i, j = rng.randrange(n), rng.randrange(n)
        out[i], out[j] = out[j], out[i]
    for _ in range(n // 40):
        out.insert(rng.randrange(n), out[rng.randrange(n)])
    return out


def reference(kind: str, sets: list[list[str]], accs: dict[int, dict[Any, Any]], s: int, t: int) -> dict[str, str]:
    """dims_key -> JSON of the state: every set of `sets`, merged one by one in key order."""
    cls = ACCUMULATORS[kind]
    names = cls.dimension_names
    keys = sorted(k for b in range(t, t + s * 1000, BASE_MS) for k in accs.get(b, ()))
    finest = {k: cls.from_state(accs[k[0]][k]["a"]) for k in keys}
    out: dict[str, str] = {}
    merged: dict[str, Any] = {}
    for set_names in sets:
        for key in keys:
            values = {d: key[1][names.index(d)] for d in set_names}
            if "" in values.values():
                continue
            acc = merged.setdefault(dimensions_key(values), cls())
            acc.merge(finest[key])
    for dk, acc in merged.items():
        out[dk] = json.dumps(acc.to_state())
    return out


def check_close(
    pw: PartitionWindows, sets: Any, before: dict[str, Any], res: CloseResult, force: bool = False
) -> None:
    """Every partial of `res` is the reference's state of its window and set, in the reference's
    order; every window that closed has its partials."""
    accs: dict[int, dict[Any, Any]] = {}  # by smallest window start
    for k, v in before["accs"]:
        accs.setdefault(k[0], {})[(k[0], tuple(k[1]))] = v
    late: dict[int, dict[Any, Any]] = {}
    for k, v in before["late"]:
        late.setdefault(k[0], {})[(k[0], tuple(k[1]))] = v
    got: dict[tuple[str, int, int], dict[str, str]] = {}
    for p in res.partials:
        got.setdefault((p.source, p.window_s, p.start_ms), {})[p.dims_key] = json.dumps(p.state)
        assert p.dims_key == dimensions_key(p.dims)
    for (source, s, t), states in got.items():
        of_size = sets[s] if isinstance(sets, dict) else sets
        want = reference(pw.kind, of_size, late if source.endswith(LATE_SUFFIX) else accs, s, t)
        assert list(states.items()) == list(want.items())
    prev, mark = before["meta"]["c"], res.mark_ms
    closing = {
        (s, b - b % (s * 1000))
        for b in accs
        for s in pw.windows_s
        if (prev is None or b - b % (s * 1000) + s * 1000 > prev)
        and (force or (mark is not None and b - b % (s * 1000) + s * 1000 <= mark))
    }
    assert {(s, t) for source, s, t in got if source == pw.source} == closing


def snapshot(pw: PartitionWindows) -> dict[str, Any]:
    """The partition's state as the changelog holds it (JSON), ids aside."""
    return json.loads(json.dumps({
        "meta": pw.meta_state(),
        "accs": [[list(k), pw.acc_state(k)] for k in pw.accs],
        "late": [[list(k), pw.late_state(k)] for k in pw.late_accs],
    }))  # fmt: skip


def restored(pw: PartitionWindows, snap: dict[str, Any], make: Any) -> PartitionWindows:
    new: PartitionWindows = make()
    new.restore_meta(snap["meta"])
    for k, v in snap["accs"]:
        new.restore_acc((k[0], tuple(k[1])), v)
    for k, v in snap["late"]:
        new.restore_late((k[0], tuple(k[1])), v)
    new.seen = pw.seen  # the ids as they were (dedup is not what this test checks)
    new.last_event_wall = pw.last_event_wall
    return new


@pytest.mark.parametrize("seed", range(8))
def test_roll_up_equals_one_by_one_merge_and_a_window_closed_again_is_the_same(seed: int) -> None:
    rng = random.Random(seed)
    sizes = [[10, 60], [10, 60, 300], [5, 10, 60], [10], [30, 60, 120]][seed % 5]
    per_size = {s: rng.sample(ALL_SETS, rng.randrange(3, len(ALL_SETS))) for s in sizes}
    dims: Any = per_size if seed % 3 else per_size[sizes[0]]
    lateness = [0.0, 60.0, 300.0][seed % 3]

    def make() -> PartitionWindows:
        return PartitionWindows("calls", "calls:0", sizes, 2.0, 5.0, dims, 600.0, lateness)

    evs = events(rng, 1500, [2.0, 5.0, 10.0][seed % 3], [3, 40, 2000][seed % 3], [2, 30, 500][seed % 3],
                 [0.0, 0.3, 0.9][seed % 3])  # fmt: skip
    pw = make()
    wall, offset, i, closed, reclosed = 1000.0, 0, 0, 0, 0
    while i < len(evs):
        n = rng.randrange(1, 300)
        pw.apply([(offset + j, e) for j, e in enumerate(evs[i : i + n])], now_wall=wall)
        offset, i, wall = offset + n, i + n, wall + rng.random() * 3
        before = snapshot(pw)
        res = pw.close(now_wall=wall)
        check_close(pw, dims, before, res)
        closed += len(res.partials)
        if res.partials:
            # a crash before the close mark was written: restored, the same windows close again
            # to the same partials (the late ones go out again too, all of them: restore_late)
            again = restored(pw, before, make).close(now_wall=wall)
            check_close(pw, dims, before, again)
            first = [json.dumps([p.window_s, p.start_ms, p.dims, p.state]) for p in res.partials if p.source == pw.source]
            assert [
                json.dumps([p.window_s, p.start_ms, p.dims, p.state]) for p in again.partials if p.source == pw.source
            ] == first
            reclosed += len(again.partials)
        if rng.random() < 0.2:
            pw = restored(pw, snapshot(pw), make)  # a restart: the kept sets are gone
    before = snapshot(pw)
    res = pw.close(now_wall=wall, force=True)
    check_close(pw, dims, before, res, force=True)
    assert closed + len(res.partials) > 100 and reclosed > 0


def test_other_kinds_roll_up_as_the_one_by_one_merge() -> None:
    rng = random.Random(7)
    sets = [[], ["model"], ["app"], ["model", "app"]]
    pw = PartitionWindows("feedback", "feedback:0", [10, 60], 0.0, 5.0, sets)
    fb = []
    for i in range(400):
        rel = rng.choice([None, rng.random() * 5])
        fb.append(Feedback(
            event_id=f"f{i}", call_event_id="c", ts=T0 + timedelta(seconds=rng.random() * 200),
            model=rng.choice([None, "m1", "m2"]), app=rng.choice(["a", "b"]), relevance=rel,
            intent_correct=rng.choice([True, False] if rel is None else [None, True, False]),
        ))  # fmt: skip
    pw.apply(list(enumerate(fb)), now_wall=0)
    before = snapshot(pw)
    res = pw.close(now_wall=0, force=True)
    check_close(pw, sets, before, res, force=True)
    assert len(res.partials) > 20
