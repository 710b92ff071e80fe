"""The sketch's figures as stage 2 computes them (quantiles and histogram from one pass over the
sorted bins, reported values and buckets memoized per bin key) are the plain definitions', to the bit."""

from __future__ import annotations

import bisect
import random

import pytest

from llmpulse.schemas.aggregate import LATENCY_BUCKETS_S, TTFT_BUCKETS_S
from llmpulse.streams.sketch import _GAMMA, QuantileSketch, SketchSummary

BOUNDS = [tuple(b * 1000 for b in LATENCY_BUCKETS_S), tuple(b * 1000 for b in TTFT_BUCKETS_S)]


def plain_quantile(s: QuantileSketch, q: float) -> float | None:
    """The definition: the bin where the rank falls, walked from the smallest."""
    if s.count == 0:
        return None
    rank = q * (s.count - 1)
    if rank < s.zeros:
        return 0.0
    seen = s.zeros
    for key in sorted(s.bins):
        seen += s.bins[key]
        if seen > rank:
            return 2 * _GAMMA**key / (_GAMMA + 1)
    return 2 * _GAMMA ** max(s.bins) / (_GAMMA + 1)


def plain_counts(s: QuantileSketch, bounds: tuple[float, ...]) -> list[int]:
    counts = [0] * (len(bounds) + 1)
    if s.count == 0:
        return counts
    counts[0] += s.zeros
    for key, n in s.bins.items():
        counts[bisect.bisect_left(bounds, 2 * _GAMMA**key / (_GAMMA + 1))] += n
    return counts


def sketches(rnd: random.Random) -> list[QuantileSketch]:
    out = [QuantileSketch()]
    for n in [1, 1, 2, 3, 5, 20, 100, 2000] * 25:
        s = QuantileSketch()
        scale = 10 ** rnd.uniform(-4, 7)
        for _ in range(n):
            s.add(0.0 if rnd.random() < 0.1 else rnd.lognormvariate(0, rnd.choice([0.001, 1.0, 3.0])) * scale)
        out.append(s)
    short = QuantileSketch()  # counts short of `count` (a hand-made state): the top bin
    short.bins, short.zeros, short.count = {3: 1, 9: 1}, 1, 10
    single_short = QuantileSketch()
    single_short.bins, single_short.zeros, single_short.count = {-40: 2}, 3, 9
    return [*out, short, single_short]


def test_quantiles_and_buckets_are_the_plain_definitions() -> None:
    rnd = random.Random(15)
    qs = (0.0, 0.25, 0.5, 0.95, 0.99, 1.0)
    summaries = [SketchSummary(qs, bounds) for bounds in BOUNDS] + [SketchSummary((0.95,), BOUNDS[1])]
    for s in sketches(rnd):
        expected = [plain_quantile(s, q) for q in qs]
        assert [s.quantile(q) for q in qs] == expected, (s.bins, s.zeros, s.count)
        for summary in summaries:
            for _ in range(2):  # the buckets memoized the second time
                got = summary.of(s.bins, s.zeros, s.count)
                assert got == ([plain_quantile(s, q) for q in summary.qs], plain_counts(s, summary.bounds))
            assert summary.of_sketch(s) == got
        for bounds in BOUNDS:
            assert s.bucket_counts(bounds) == plain_counts(s, bounds)


def test_a_summary_takes_its_quantiles_in_order() -> None:
    with pytest.raises(ValueError, match="ascending"):
        SketchSummary((0.95, 0.5), BOUNDS[0])
    with pytest.raises(ValueError, match="within"):
        SketchSummary((-0.5, 0.5), BOUNDS[0])


def test_a_summarys_lists_are_new_each_time() -> None:
    """A one-bin sketch's quantiles come from a memo per bin key: each call gets its own lists
    (an aggregate takes them over)."""
    summary = SketchSummary((0.5, 0.95), BOUNDS[0])
    first = summary.of({40: 1}, 0, 1)
    first[0][0] = -1.0
    first[1][0] = -1
    again = summary.of({40: 1}, 0, 1)
    assert again[0] != first[0] and again[1] != first[1]
    assert again == ([2 * _GAMMA**40 / (_GAMMA + 1)] * 2, plain_counts(QuantileSketch.from_state({"b": {40: 1}, "n": 1}), BOUNDS[0]))
