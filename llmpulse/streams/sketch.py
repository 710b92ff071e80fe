"""A mergeable quantile sketch (DDSketch): every quantile within a stated relative error.

Values are counted in logarithmic buckets of ratio gamma = (1 + a) / (1 - a); the
value reported for a bucket is within relative error `a` of every value in it, so
any quantile is within `a` of the true sample quantile (DDSketch, Masson et al. 2019).
Sketches of the same accuracy merge by adding bucket counts, which is what lets
partition partials and window roll-ups combine exactly.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

RELATIVE_ACCURACY = 0.01
"""Every quantile is within 1% of a true sample value at that rank."""
_GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
LOG_GAMMA = math.log(_GAMMA)
MIN_VALUE = 1e-3  # values at or below this (ms) count as zero

# A bin's reported value by bin key: the same arithmetic every time, done once per key (keys
# are few: about 35 per doubling of a value). Computed per aggregate, the reported values and
# their histogram buckets were most of the cost of an aggregate's figures.
_reported: dict[int, float] = {}


def reported(key: int) -> float:
    """The value reported for bin `key`: within the relative accuracy of every value in it."""
    try:
        return _reported[key]
    except KeyError:
        value = _reported[key] = 2 * _GAMMA**key / (_GAMMA + 1)
        return value


class QuantileSketch:
    __slots__ = ("bins", "count", "zeros")

    def __init__(self) -> None:
        self.bins: dict[int, int] = {}
        self.zeros = 0
        self.count = 0

    def add(self, value: float) -> None:
        # CallAccumulator.agg writes this out for its two sketches: change both alike
        self.count += 1
        if value <= MIN_VALUE:
            self.zeros += 1
            return
        key = math.ceil(math.log(value) / LOG_GAMMA)
        bins = self.bins
        bins[key] = bins.get(key, 0) + 1

    def merge(self, other: QuantileSketch) -> None:
        self.count += other.count
        self.zeros += other.zeros
        bins = self.bins
        for k, n in other.bins.items():
            bins[k] = bins.get(k, 0) + n

    def quantile(self, q: float) -> float | None:
        if self.count == 0:
            return None
        rank = q * (self.count - 1)
        if rank < self.zeros:
            return 0.0
        seen = self.zeros
        for key in sorted(self.bins):
            seen += self.bins[key]
            if seen > rank:
                return reported(key)
        return reported(max(self.bins))

    def bucket_counts(self, bounds: tuple[float, ...]) -> list[int]:
        """Counts per histogram bucket: bucket i holds the values in (bounds[i-1], bounds[i]], the last
        one (index len(bounds)) everything above. A value is placed by its bin's reported value, so
        only values within the relative accuracy of a bound can land in the bucket beside theirs."""
        counts = [0] * (len(bounds) + 1)
        if self.count == 0:
            return counts
        counts[0] += self.zeros
        for key, n in self.bins.items():
            counts[bisect.bisect_left(bounds, reported(key))] += n
        return counts

    def to_state(self) -> dict[str, Any]:
        # the bins keep their int keys: every encoder of a state (msgspec, json) writes them
        # as JSON's string keys, and from_state reads either. A copy, not the live dict: a
        # state is encoded later than it is taken (changelog_state.py queues it).
        return {"b": dict(self.bins), "z": self.zeros, "n": self.count}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> QuantileSketch:
        s = cls.__new__(cls)
        s.bins, s.zeros, s.count = parts_of_state(state)
        return s


def parts_of_state(state: dict[str, Any]) -> tuple[dict[int, int], int, int]:
    """A sketch's bins, zeros and count from its `to_state` (or that state decoded from JSON: bin
    keys as strings): `QuantileSketch.from_state`, for holders of a sketch's parts (accumulators)."""
    return (
        {int(k): int(v) for k, v in state.get("b", {}).items()},
        int(state.get("z", 0)),
        int(state.get("n", 0)),
    )


class SketchSummary:
    """Some quantiles and a histogram of sketches, from one pass over their sorted bins:
    `of(bins, zeros, count)` is `([sketch.quantile(q) for q in qs], sketch.bucket_counts(bounds))`
    of the sketch holding them, to the bit. Each bin key's bucket is found once (memoized):
    a window's aggregates are thousands of small sketches over the same few keys."""

    __slots__ = ("_blank", "_bucket", "_one", "bounds", "qs")

    def __init__(self, qs: tuple[float, ...], bounds: tuple[float, ...]) -> None:
        if list(qs) != sorted(qs):
            raise ValueError(f"quantiles must be ascending, got {qs}")
        if any(not 0.0 <= q <= 1.0 for q in qs):  # `of` counts on no rank below 0
            raise ValueError(f"quantiles must be within [0, 1], got {qs}")
        self.qs = qs
        self.bounds = bounds
        self._blank = [0] * (len(bounds) + 1)  # copied for each histogram
        self._bucket: dict[int, int] = {}
        # a one-bin sketch without zeros (most of sparse traffic's: one call, or calls alike):
        # by bin key, its histogram bucket and every quantile's value
        self._one: dict[int, tuple[int, list[float | None]]] = {}

    def of(self, bins: dict[int, int], zeros: int, count: int) -> tuple[list[float | None], list[int]]:
        counts = self._blank.copy()
        if count == 0:
            return [None] * len(self.qs), counts
        if not zeros and len(bins) == 1:
            # every rank falls in the one bin (or past the counts: the top bin, the same)
            ((key, n),) = bins.items()
            try:
                i, values = self._one[key]
            except KeyError:
                i, values = self._one[key] = (self._bucket_of(key), [reported(key)] * len(self.qs))
            counts[i] = n
            return values.copy(), counts  # copies: an aggregate takes its lists over
        counts[0] = zeros
        last = count - 1
        if len(bins) == 1:  # and some zeros
            ((key, n),) = bins.items()
            counts[self._bucket_of(key)] += n
            value = reported(key)
            return [0.0 if q * last < zeros else value for q in self.qs], counts
        ranks = [q * last for q in self.qs]
        wanted = len(ranks)
        ranks.append(math.inf)  # past the last: no bin passes it
        out: list[float | None] = []
        j = 0  # the next quantile to find
        while ranks[j] < zeros:  # within the zeros
            out.append(0.0)
            j += 1
        bucket, bounds = self._bucket, self.bounds
        seen = zeros
        for key, n in sorted(bins.items()):
            try:
                counts[bucket[key]] += n
            except KeyError:
                i = bucket[key] = bisect.bisect_left(bounds, reported(key))
                counts[i] += n
            seen += n
            while seen > ranks[j]:  # the first bin whose count passes the rank
                out.append(reported(key))
                j += 1
        if j < wanted:  # counts short of `count` (not from add/merge): the top bin
            top = reported(max(bins))
            out += [top] * (wanted - j)
        return out, counts

    def _bucket_of(self, key: int) -> int:
        try:
            return self._bucket[key]
        except KeyError:
            i = self._bucket[key] = bisect.bisect_left(self.bounds, reported(key))
            return i

    def of_sketch(self, sketch: QuantileSketch) -> tuple[list[float | None], list[int]]:
        return self.of(sketch.bins, sketch.zeros, sketch.count)
