"""Aggregators in the shape `initialize / agg / merge / result`, one per event kind.

An accumulator holds everything needed to produce a window's figures and to merge
with another accumulator of the same window (partition partials, 10 s -> 60 s roll-ups).
Cost is kept in integer nano-dollars so that sums are exact in any order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from functools import reduce
from itertools import chain
from math import ceil as _ceil
from math import log as _log
from operator import add, attrgetter, itemgetter
from typing import Any, ClassVar, Self

from llmpulse.schemas.aggregate import (
    LATENCY_BUCKETS_S,
    TTFT_BUCKETS_S,
    WindowAggregate,
    aggregate_id,
    aggregate_id_prefix,
    blank_fields,
    fields_set_of,
)
from llmpulse.schemas.call import CallEvent
from llmpulse.schemas.feedback import Feedback
from llmpulse.schemas.gpu import GpuSample
from llmpulse.schemas.host import HostSample
from llmpulse.schemas.partials import (
    CallState,
    SketchState,
    decode_call_state,
    unpack_state,
)
from llmpulse.streams.sketch import LOG_GAMMA, MIN_VALUE, SketchSummary, parts_of_state

NANO = 1_000_000_000
LATENCY_BOUNDS_MS = tuple(b * 1000 for b in LATENCY_BUCKETS_S)
TTFT_BOUNDS_MS = tuple(b * 1000 for b in TTFT_BUCKETS_S)
_LATENCY = SketchSummary((0.50, 0.95, 0.99), LATENCY_BOUNDS_MS)
_TTFT = SketchSummary((0.95,), TTFT_BOUNDS_MS)
_LAT_SUM = attrgetter("lat_sum")
_LATS = itemgetter(0)  # of a run's terms (CallAccumulator.terms)
_TTFTS = itemgetter(1)


def _ms_to_dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


class Accumulator:
    kind: ClassVar[str]
    # the finest dimension tuple of an event of this kind, and the names of its members
    dimension_names: ClassVar[tuple[str, ...]]

    def merge(self, other: Any) -> None:
        raise NotImplementedError

    def agg_many(self, events: Sequence[Any]) -> None:
        """`agg` of each event in turn (stage 1 hands an accumulator its events of a batch at once)."""
        agg = self.agg  # type: ignore[attr-defined]
        for e in events:
            agg(e)

    @classmethod
    def merged(cls, accs: Sequence[Any]) -> Self:
        """A new accumulator with `accs` merged into it in their order: the same state, to the bit,
        as `merge` of each in turn (float sums are order dependent)."""
        out = cls()
        for a in accs:
            out.merge(a)
        return out

    @classmethod
    def terms(cls, accs: Sequence[Any]) -> Any:
        """What `merged_from` reads of a run of finest accumulators (llmpulse.streams.rollup keeps
        it per group of the sets it derives others from): here the accumulators themselves."""
        return list(accs)

    @classmethod
    def merged_from(cls, parts: Sequence[Any], runs: Sequence[Any]) -> Self:
        """The same state as `merged` of the finest accumulators, where `parts` are `merged` of
        consecutive runs of them, in order, and `runs` the `terms` of those runs (one or more per
        part, in order; llmpulse.streams.rollup): here merged from the finest again; kinds whose
        roll-ups are costly derive what is exact from the parts."""
        return cls.merged(list(chain.from_iterable(runs)))

    def to_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def state_to_encode(self) -> Any:
        """What msgspec's JSON encoder writes as the text of `to_state`, encoded at once (stage 1's
        state records, window_state.py): the state itself here; kinds with a cheaper form
        (a Struct sharing this one's dicts) override it."""
        return self.to_state()

    def figures(self, window_s: int) -> dict[str, Any]:
        """The aggregate's fields of this kind, by name."""
        raise NotImplementedError

    def result(
        self, window_s: int, start_ms: int, dims: dict[str, str], dims_key: str, revision: int = 1
    ) -> WindowAggregate:
        values = self.figures(window_s)
        values["aggregate_id"] = aggregate_id(self.kind, window_s, start_ms, dims_key)
        values["kind"] = self.kind
        values["window_s"] = window_s
        values["window_start"] = _ms_to_dt(start_ms)
        values["window_end"] = _ms_to_dt(start_ms + window_s * 1000)
        values["dimensions"] = dict(dims)
        values["dims_key"] = dims_key
        values["revision"] = revision
        return WindowAggregate.of_figures(values)


class CallAccumulator(Accumulator):
    """The calls of a window and dimension set. Its two sketches (latency, TTFT) are held as their
    parts (`lat_bins`, `lat_zeros`, `lat_n`; `ttft_*`), not as `QuantileSketch` objects: the same
    bins, zeros and counts with the same arithmetic (`QuantileSketch.add` and `merge`, written out
    below), the same states. At many users and keys stage 1 holds an accumulator per event of its
    open windows; two sketch objects each were two thirds of the objects the cyclic GC scans
    there (an accumulator is a slots object, always tracked; its dicts of ints are not), and two
    allocations per event."""

    kind = "calls"
    dimension_names = ("model", "provider", "app", "user", "api_key_hash", "operation")
    __slots__ = (
        "completion",
        "cost_nano",
        "err_types",
        "errors",
        "lat_bins",
        "lat_n",
        "lat_sum",
        "lat_zeros",
        "prompt",
        "requests",
        "total",
        "ttft_bins",
        "ttft_n",
        "ttft_sum",
        "ttft_zeros",
        "unpriced",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.err_types: dict[str, int] = {}
        self.lat_sum = 0.0
        self.lat_bins: dict[int, int] = {}
        self.lat_zeros = 0
        self.lat_n = 0
        self.ttft_bins: dict[int, int] = {}
        self.ttft_zeros = 0
        self.ttft_n = 0
        self.ttft_sum = 0.0
        self.prompt = 0
        self.completion = 0
        self.total = 0
        self.cost_nano = 0
        self.unpriced = 0

    @staticmethod
    def key_of(e: CallEvent) -> tuple[str, ...]:
        return (e.model, e.provider, e.app, e.user or "", e.api_key_hash or "", e.operation)

    def agg(self, e: CallEvent) -> None:
        # the sketches' `QuantileSketch.add` written out (the same arithmetic, the same bins).
        # Stage 1 calls this for a key's only event of a batch (most, on sparse traffic),
        # `agg_many` for several
        self.requests += 1
        status = e.status_code
        if e.error_type is not None or status >= 400 or status == 0:
            self.errors += 1
            t = e.error_type or f"http_{status}"
            self.err_types[t] = self.err_types.get(t, 0) + 1
        latency = e.latency_ms
        self.lat_sum += latency
        self.lat_n += 1
        if latency <= MIN_VALUE:
            self.lat_zeros += 1
        else:
            key = _ceil(_log(latency) / LOG_GAMMA)
            bins = self.lat_bins
            bins[key] = bins.get(key, 0) + 1
        first_token = e.ttft_ms
        if first_token is not None:
            self.ttft_n += 1
            if first_token <= MIN_VALUE:
                self.ttft_zeros += 1
            else:
                key = _ceil(_log(first_token) / LOG_GAMMA)
                bins = self.ttft_bins
                bins[key] = bins.get(key, 0) + 1
            self.ttft_sum += first_token
        self.prompt += e.prompt_tokens
        self.completion += e.completion_tokens
        self.total += e.total_tokens or 0
        cost = e.cost_usd
        if cost is None:
            self.unpriced += 1
        else:
            self.cost_nano += round(cost * NANO)

    def agg_many(self, events: Sequence[CallEvent]) -> None:
        """`agg` of each event in turn, to the bit: the float sums add the same terms in the same
        order, the error types and sketch bins are inserted in the same order. Stage 1 hands an
        accumulator its events of a batch at once (windowing.py): the running figures are local
        variables, not attribute writes (from about 2 events on, cheaper than `agg` of each)."""
        errors = self.errors
        err_types = self.err_types
        lat_sum = self.lat_sum
        lat_bins = self.lat_bins
        lat_zeros = self.lat_zeros
        ttft_bins = self.ttft_bins
        ttft_n = self.ttft_n
        ttft_zeros = self.ttft_zeros
        ttft_sum = self.ttft_sum
        prompt = self.prompt
        completion = self.completion
        total = self.total
        cost_nano = self.cost_nano
        unpriced = self.unpriced
        for e in events:
            status = e.status_code
            error_type = e.error_type
            if error_type is not None or status >= 400 or status == 0:
                errors += 1
                t = error_type or f"http_{status}"
                err_types[t] = err_types.get(t, 0) + 1
            latency = e.latency_ms
            lat_sum += latency
            if latency <= MIN_VALUE:
                lat_zeros += 1
            else:
                key = _ceil(_log(latency) / LOG_GAMMA)
                lat_bins[key] = lat_bins.get(key, 0) + 1
            first_token = e.ttft_ms
            if first_token is not None:
                ttft_n += 1
                if first_token <= MIN_VALUE:
                    ttft_zeros += 1
                else:
                    key = _ceil(_log(first_token) / LOG_GAMMA)
                    ttft_bins[key] = ttft_bins.get(key, 0) + 1
                ttft_sum += first_token
            prompt += e.prompt_tokens
            completion += e.completion_tokens
            total += e.total_tokens or 0
            cost = e.cost_usd
            if cost is None:
                unpriced += 1
            else:
                cost_nano += round(cost * NANO)
        n = len(events)
        self.requests += n
        self.errors = errors
        self.lat_sum = lat_sum
        self.lat_n += n
        self.lat_zeros = lat_zeros
        self.ttft_n = ttft_n
        self.ttft_zeros = ttft_zeros
        self.ttft_sum = ttft_sum
        self.prompt = prompt
        self.completion = completion
        self.total = total
        self.cost_nano = cost_nano
        self.unpriced = unpriced

    def merge(self, o: CallAccumulator) -> None:
        self.requests += o.requests
        self.errors += o.errors
        for t, n in o.err_types.items():
            self.err_types[t] = self.err_types.get(t, 0) + n
        self.lat_sum += o.lat_sum
        # the sketches' `QuantileSketch.merge` written out
        self.lat_n += o.lat_n
        self.lat_zeros += o.lat_zeros
        bins = self.lat_bins
        for k, n in o.lat_bins.items():
            bins[k] = bins.get(k, 0) + n
        self.ttft_n += o.ttft_n
        self.ttft_zeros += o.ttft_zeros
        bins = self.ttft_bins
        for k, n in o.ttft_bins.items():
            bins[k] = bins.get(k, 0) + n
        self.ttft_sum += o.ttft_sum
        self.prompt += o.prompt
        self.completion += o.completion
        self.total += o.total
        self.cost_nano += o.cost_nano
        self.unpriced += o.unpriced

    @classmethod
    def merged(cls, accs: Sequence[CallAccumulator]) -> Self:
        # `merge` of each into a new accumulator, in one loop: a window's roll-up merges every
        # finest accumulator once per dimension set, most of them holding one event, so the
        # calls and attribute writes per merge were most of the cost of closing a window.
        # Integers add in any order; the float sums, the error types and the sketch bins are
        # added in the order of `accs`, as `merge` does (same sums, same dict order).
        # Per member only what can hold something is read: an accumulator's error types are
        # its errors by type (agg and merge add both, from_state reads what they wrote), so no
        # errors means none; a sketch's count is its zeros and binned values, so a TTFT sketch
        # of count 0 (no streamed call: most) holds nothing, and its TTFT sum is 0.0 (a sum of
        # none; agg and merge add to both at once), which leaves a sum from 0.0 as it is.
        requests = errors = prompt = completion = total = cost_nano = unpriced = 0
        lat_n = lat_zeros = ttft_n = ttft_zeros = 0
        lat_sum = ttft_sum = 0.0
        err_types: dict[str, int] = {}
        lat_bins: dict[int, int] = {}
        ttft_bins: dict[int, int] = {}
        for o in accs:
            requests += o.requests
            n = o.errors
            if n:
                errors += n
                for t, n in o.err_types.items():
                    err_types[t] = err_types.get(t, 0) + n
            lat_sum += o.lat_sum
            lat_n += o.lat_n
            lat_zeros += o.lat_zeros
            for k, n in o.lat_bins.items():
                # a membership test and an in-place add: cheaper than a bound `get` call
                if k in lat_bins:
                    lat_bins[k] += n
                else:
                    lat_bins[k] = n
            n = o.ttft_n
            if n:
                ttft_n += n
                ttft_zeros += o.ttft_zeros
                for k, n in o.ttft_bins.items():
                    if k in ttft_bins:
                        ttft_bins[k] += n
                    else:
                        ttft_bins[k] = n
                ttft_sum += o.ttft_sum
            prompt += o.prompt
            completion += o.completion
            total += o.total
            cost_nano += o.cost_nano
            unpriced += o.unpriced
        # made without __init__: its empty dicts would be replaced at once
        out = cls.__new__(cls)
        out.requests = requests
        out.errors = errors
        out.err_types = err_types
        out.lat_sum = lat_sum
        out.lat_bins, out.lat_zeros, out.lat_n = lat_bins, lat_zeros, lat_n
        out.ttft_bins, out.ttft_zeros, out.ttft_n = ttft_bins, ttft_zeros, ttft_n
        out.ttft_sum = ttft_sum
        out.prompt = prompt
        out.completion = completion
        out.total = total
        out.cost_nano = cost_nano
        out.unpriced = unpriced
        return out

    @classmethod
    def terms(cls, accs: Sequence[CallAccumulator]) -> tuple[list[float], list[float]]:
        # the float sums of a run, in order, are all `merged_from` reads of it: kept as lists of
        # floats, a derived set's sums are added again without reading each finest accumulator
        # (one object and a call per term, most of a roll-up's reads of memory it no longer has
        # in cache). The TTFT sums only of accumulators with a TTFT: the others' sum is 0.0 (a
        # sum of none; agg and merge add to both at once), and adding 0.0 or -0.0 leaves a sum
        # from 0.0 as it is (such a sum is never -0.0)
        return list(map(_LAT_SUM, accs)), [a.ttft_sum for a in accs if a.ttft_n]

    @classmethod
    def merged_from(cls, parts: Sequence[CallAccumulator], runs: Sequence[tuple[list[float], list[float]]]) -> Self:
        # Integers, error types and sketch bins from the parts (the runs merged in order insert
        # the dicts' keys in the order the finest would); the float sums are added again from
        # the runs' terms in order, as merging the finest one by one adds them. One part is
        # the sums of the same terms in the same order already (a sum from 0.0 is never -0.0);
        # no TTFT at all (no streamed call) is a TTFT sum of 0.0 however it is added (merged).
        out = cls.merged(parts)
        if len(parts) > 1:
            out.lat_sum = reduce(add, chain.from_iterable(map(_LATS, runs)), 0.0)
            if out.ttft_n:
                out.ttft_sum = reduce(add, chain.from_iterable(map(_TTFTS, runs)), 0.0)
        return out

    def to_state(self) -> dict[str, Any]:
        # the sketches' states as `QuantileSketch.to_state` writes them (bins copied: the state
        # is encoded later than it is taken, changelog_state.py)
        return {
            "r": self.requests,
            "e": self.errors,
            "et": self.err_types,
            "ls": self.lat_sum,
            "l": {"b": dict(self.lat_bins), "z": self.lat_zeros, "n": self.lat_n},
            "t": {"b": dict(self.ttft_bins), "z": self.ttft_zeros, "n": self.ttft_n},
            "tf": self.ttft_sum,
            "p": self.prompt,
            "c": self.completion,
            "tt": self.total,
            "cn": self.cost_nano,
            "u": self.unpriced,
        }

    def state_to_encode(self) -> CallState:
        # every dict shared, not copied: the text is made before this accumulator changes again
        return CallState(
            r=self.requests, e=self.errors, et=self.err_types, ls=self.lat_sum,
            l=SketchState(self.lat_bins, self.lat_zeros, self.lat_n),
            t=SketchState(self.ttft_bins, self.ttft_zeros, self.ttft_n), tf=self.ttft_sum,
            p=self.prompt, c=self.completion, tt=self.total, cn=self.cost_nano, u=self.unpriced,
        )  # fmt: skip

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> CallAccumulator:
        a = cls.__new__(cls)  # every slot is set below: no empty dicts to throw away
        a.requests = s["r"]
        a.errors = s["e"]
        a.err_types = dict(s["et"])
        a.lat_sum = s["ls"]
        a.lat_bins, a.lat_zeros, a.lat_n = parts_of_state(s["l"])
        a.ttft_bins, a.ttft_zeros, a.ttft_n = parts_of_state(s["t"])
        a.ttft_sum = s.get("tf", 0.0)  # states written before the sum was kept: no sum
        a.prompt = s["p"]
        a.completion = s["c"]
        a.total = s["tt"]
        a.cost_nano = s["cn"]
        a.unpriced = s["u"]
        return a

    @classmethod
    def of_call_state(cls, s: CallState) -> CallAccumulator:
        """`from_state` of a state decoded typed (schemas.partials.decode_call_state): the same
        accumulator, its dicts taken over (a decoded state is used once)."""
        a = cls.__new__(cls)
        a.requests = s.r
        a.errors = s.e
        a.err_types = s.et
        a.lat_sum = s.ls
        lat, ttft = s.l, s.t
        a.lat_bins, a.lat_zeros, a.lat_n = lat.b, lat.z, lat.n
        a.ttft_bins, a.ttft_zeros, a.ttft_n = ttft.b, ttft.z, ttft.n
        a.ttft_sum = s.tf
        a.prompt = s.p
        a.completion = s.c
        a.total = s.tt
        a.cost_nano = s.cn
        a.unpriced = s.u
        return a

    def state(self) -> CallState:
        """`to_state` as stage 2 decodes it (schemas.partials.CallState), sharing this one's bins
        (read only) but not its error types (an aggregate takes them over: call_figures)."""
        return CallState(
            r=self.requests, e=self.errors, et=dict(self.err_types), ls=self.lat_sum,
            l=SketchState(self.lat_bins, self.lat_zeros, self.lat_n),
            t=SketchState(self.ttft_bins, self.ttft_zeros, self.ttft_n), tf=self.ttft_sum,
            p=self.prompt, c=self.completion, tt=self.total, cn=self.cost_nano, u=self.unpriced,
        )  # fmt: skip

    def figures(self, window_s: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        call_figures(out, window_s, self.state())
        return out


def call_figures(out: dict[str, Any], window_s: int, s: CallState) -> None:
    """A calls aggregate's fields, put in `out`, of an accumulator's state (`CallAccumulator.state`,
    or a state of the partials as stage 2 decodes it): `CallAccumulator.figures`. The state's
    error types become the aggregate's."""
    n = s.r
    error_rate = s.e / n if n else 0.0
    lat, ttft = s.l, s.t
    (p50, p95, p99), lat_hist = _LATENCY.of(lat.b, lat.z, lat.n)
    if ttft.n:
        (ttft_p95,), ttft_hist = _TTFT.of(ttft.b, ttft.z, ttft.n)
    else:  # no streamed call: what `of` gives for an empty sketch, no histogram
        ttft_p95, ttft_hist = None, []
    out["requests"] = n
    out["errors"] = s.e
    out["errors_by_type"] = s.et
    out["qps"] = n / window_s
    out["error_rate"] = error_rate
    out["success_rate"] = 1.0 - error_rate if n else 1.0
    out["latency_sum_ms"] = s.ls
    out["latency_avg_ms"] = s.ls / n if n else None
    out["latency_p50_ms"] = p50
    out["latency_p95_ms"] = p95
    out["latency_p99_ms"] = p99
    out["ttft_p95_ms"] = ttft_p95
    out["latency_hist"] = lat_hist if n else []
    out["ttft_hist"] = ttft_hist
    out["ttft_count"] = ttft.n
    out["ttft_sum_ms"] = s.tf
    out["prompt_tokens"] = s.p
    out["completion_tokens"] = s.c
    out["total_tokens"] = s.tt
    out["cost_usd"] = s.cn / NANO
    out["unpriced_requests"] = s.u


class FeedbackAccumulator(Accumulator):
    kind = "feedback"
    dimension_names = ("model", "app")
    __slots__ = ("count", "intent_n", "intent_ok", "rel_n", "rel_sum")

    def __init__(self) -> None:
        self.count = 0
        self.intent_n = 0
        self.intent_ok = 0
        self.rel_n = 0
        self.rel_sum = 0.0

    @staticmethod
    def key_of(e: Feedback) -> tuple[str, ...]:
        return (e.model or "", e.app)

    def agg(self, e: Feedback) -> None:
        self.count += 1
        if e.intent_correct is not None:
            self.intent_n += 1
            self.intent_ok += int(e.intent_correct)
        if e.relevance is not None:
            self.rel_n += 1
            self.rel_sum += e.relevance

    def merge(self, o: FeedbackAccumulator) -> None:
        self.count += o.count
        self.intent_n += o.intent_n
        self.intent_ok += o.intent_ok
        self.rel_n += o.rel_n
        self.rel_sum += o.rel_sum

    def to_state(self) -> dict[str, Any]:
        return {"n": self.count, "in": self.intent_n, "io": self.intent_ok, "rn": self.rel_n, "rs": self.rel_sum}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> FeedbackAccumulator:
        a = cls.__new__(cls)
        a.count, a.intent_n, a.intent_ok, a.rel_n, a.rel_sum = s["n"], s["in"], s["io"], s["rn"], s["rs"]
        return a

    def figures(self, window_s: int) -> dict[str, Any]:
        return {
            "feedback_count": self.count,
            "intent_accuracy": self.intent_ok / self.intent_n if self.intent_n else None,
            "relevance_avg": self.rel_sum / self.rel_n if self.rel_n else None,
        }


class GpuAccumulator(Accumulator):
    kind = "gpu"
    dimension_names = ("host", "gpu")
    __slots__ = ("mem_max", "mem_util_sum", "n", "power_n", "power_sum", "temp_max", "util_max", "util_sum")

    def __init__(self) -> None:
        self.n = 0
        self.util_sum = 0.0
        self.util_max = 0.0
        self.mem_max = 0
        self.mem_util_sum = 0.0
        self.temp_max: float | None = None
        self.power_sum = 0.0
        self.power_n = 0

    @staticmethod
    def key_of(e: GpuSample) -> tuple[str, ...]:
        return (e.host, str(e.gpu_index))

    def agg(self, e: GpuSample) -> None:
        self.n += 1
        self.util_sum += e.utilization_gpu_pct
        self.util_max = max(self.util_max, e.utilization_gpu_pct)
        self.mem_max = max(self.mem_max, e.memory_used_bytes)
        self.mem_util_sum += e.utilization_memory_pct
        if e.temperature_c is not None:
            self.temp_max = e.temperature_c if self.temp_max is None else max(self.temp_max, e.temperature_c)
        if e.power_draw_w is not None:
            self.power_sum += e.power_draw_w
            self.power_n += 1

    def merge(self, o: GpuAccumulator) -> None:
        self.n += o.n
        self.util_sum += o.util_sum
        self.util_max = max(self.util_max, o.util_max)
        self.mem_max = max(self.mem_max, o.mem_max)
        self.mem_util_sum += o.mem_util_sum
        if o.temp_max is not None:
            self.temp_max = o.temp_max if self.temp_max is None else max(self.temp_max, o.temp_max)
        self.power_sum += o.power_sum
        self.power_n += o.power_n

    def to_state(self) -> dict[str, Any]:
        return {
            "n": self.n, "us": self.util_sum, "um": self.util_max, "mm": self.mem_max,
            "mu": self.mem_util_sum, "tm": self.temp_max, "ps": self.power_sum, "pn": self.power_n,
        }  # fmt: skip

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> GpuAccumulator:
        a = cls.__new__(cls)
        a.n, a.util_sum, a.util_max, a.mem_max = s["n"], s["us"], s["um"], s["mm"]
        a.mem_util_sum, a.temp_max, a.power_sum, a.power_n = s["mu"], s["tm"], s["ps"], s["pn"]
        return a

    def figures(self, window_s: int) -> dict[str, Any]:
        n = self.n
        return {
            "samples": n,
            "gpu_util_avg_pct": self.util_sum / n if n else None,
            "gpu_util_max_pct": self.util_max if n else None,
            "memory_used_max_bytes": self.mem_max if n else None,
            "memory_util_avg_pct": self.mem_util_sum / n if n else None,
            "temperature_max_c": self.temp_max,
            "power_avg_w": self.power_sum / self.power_n if self.power_n else None,
        }


class HostAccumulator(Accumulator):
    """CPU, memory and load of one host over a window: averages and peaks of its samples."""

    kind = "host"
    dimension_names = ("host",)
    __slots__ = ("cpu_max", "cpu_sum", "load1_n", "load1_sum", "mem_bytes_max", "mem_max", "mem_sum", "n")

    def __init__(self) -> None:
        self.n = 0
        self.cpu_sum = 0.0
        self.cpu_max = 0.0
        self.mem_sum = 0.0
        self.mem_max = 0.0
        self.mem_bytes_max = 0
        self.load1_sum = 0.0
        self.load1_n = 0

    @staticmethod
    def key_of(e: HostSample) -> tuple[str, ...]:
        return (e.host,)

    def agg(self, e: HostSample) -> None:
        self.n += 1
        self.cpu_sum += e.cpu_pct
        self.cpu_max = max(self.cpu_max, e.cpu_pct)
        self.mem_sum += e.memory_used_pct
        self.mem_max = max(self.mem_max, e.memory_used_pct)
        self.mem_bytes_max = max(self.mem_bytes_max, e.memory_used_bytes)
        if e.load1 is not None:
            self.load1_sum += e.load1
            self.load1_n += 1

    def merge(self, o: HostAccumulator) -> None:
        self.n += o.n
        self.cpu_sum += o.cpu_sum
        self.cpu_max = max(self.cpu_max, o.cpu_max)
        self.mem_sum += o.mem_sum
        self.mem_max = max(self.mem_max, o.mem_max)
        self.mem_bytes_max = max(self.mem_bytes_max, o.mem_bytes_max)
        self.load1_sum += o.load1_sum
        self.load1_n += o.load1_n

    def to_state(self) -> dict[str, Any]:
        return {
            "n": self.n, "cs": self.cpu_sum, "cm": self.cpu_max, "ms": self.mem_sum, "mm": self.mem_max,
            "mb": self.mem_bytes_max, "ls": self.load1_sum, "ln": self.load1_n,
        }  # fmt: skip

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> HostAccumulator:
        a = cls.__new__(cls)
        a.n, a.cpu_sum, a.cpu_max, a.mem_sum, a.mem_max = s["n"], s["cs"], s["cm"], s["ms"], s["mm"]
        a.mem_bytes_max, a.load1_sum, a.load1_n = s["mb"], s["ls"], s["ln"]
        return a

    def figures(self, window_s: int) -> dict[str, Any]:
        n = self.n
        return {
            "samples": n,
            "host_cpu_avg_pct": self.cpu_sum / n if n else None,
            "host_cpu_max_pct": self.cpu_max if n else None,
            "host_memory_avg_pct": self.mem_sum / n if n else None,
            "host_memory_max_pct": self.mem_max if n else None,
            "memory_used_max_bytes": self.mem_bytes_max if n else None,
            "host_load1_avg": self.load1_sum / self.load1_n if self.load1_n else None,
        }


ACCUMULATORS: dict[
    str, type[CallAccumulator] | type[FeedbackAccumulator] | type[GpuAccumulator] | type[HostAccumulator]
] = {
    "calls": CallAccumulator,
    "feedback": FeedbackAccumulator,
    "gpu": GpuAccumulator,
    "host": HostAccumulator,
}


def merged_states(kind: str, states: Iterable[bytes]) -> Accumulator:
    """The accumulator of a dimension set's parts, as stage 2 holds them (packed states,
    schemas.partials.pack_state), in order: the first part's state, each next merged into it
    (most sets have one part: no merge at all). The same figures as merging each into an
    empty one, which adds zeros and takes maxima with zero; an empty accumulator for none."""
    if kind == "calls":  # decoded typed and merged as states (merged_call_state)
        return CallAccumulator.of_call_state(merged_call_state(states))
    cls = ACCUMULATORS[kind]
    acc: Accumulator | None = None
    for packed in states:
        part = cls.from_state(unpack_state(packed))
        if acc is None:
            acc = part
        else:
            acc.merge(part)  # type: ignore[arg-type]
    return cls() if acc is None else acc


def merged_call_state(parts: Iterable[bytes]) -> CallState:
    """A calls set's packed states decoded typed (schemas.partials.CallState) and merged in
    order, each next into the first (`CallState.merge`: `CallAccumulator.merge` on states, the
    same sums); an empty accumulator's state for none. Most sets have one part: no merge."""
    states = list(map(decode_call_state, parts))
    if not states:
        return CallAccumulator().state()
    s = states[0]
    for o in states[1:]:
        s.merge(o)
    return s


class WindowResults:
    """The aggregates of one window, each from its dimension set's parts as stage 2 holds them
    (packed states, in the order of their sources): `merged_states(kind, parts).result(window_s,
    start_ms, dims, dims_key, revision)`, the same model to the bit. The fields the aggregates share
    (the window's, the blank ones) are made once for the window; a calls set's parts are
    decoded typed and merged as states (merged_call_state), with no accumulator or sketch
    objects: sparse traffic makes thousands of one-call aggregates."""

    __slots__ = ("_base", "_id_prefix", "kind", "start_ms", "window_s")

    def __init__(self, kind: str, window_s: int, start_ms: int) -> None:
        self.kind = kind
        self.window_s = window_s
        self.start_ms = start_ms
        base = blank_fields()
        base["kind"] = kind
        base["window_s"] = window_s
        base["window_start"] = _ms_to_dt(start_ms)
        base["window_end"] = _ms_to_dt(start_ms + window_s * 1000)
        self._base = base
        self._id_prefix = aggregate_id_prefix(kind, window_s, start_ms)

    def aggregate(self, parts: Iterable[bytes], dims: dict[str, str], dims_key: str, revision: int) -> WindowAggregate:
        if self.kind != "calls":
            values = merged_states(self.kind, parts).figures(self.window_s)
            self._put_ids(values, dims, dims_key, revision)
            return WindowAggregate.of_figures(values, self._base)
        fields = self._base.copy()
        call_figures(fields, self.window_s, merged_call_state(parts))
        # _put_ids written out (one call less per aggregate)
        fields["aggregate_id"] = self._id_prefix + dims_key
        fields["dimensions"] = dict(dims)
        fields["dims_key"] = dims_key
        fields["revision"] = revision
        return WindowAggregate.of_fields(fields, _CALL_NAMES)

    def _put_ids(self, out: dict[str, Any], dims: dict[str, str], dims_key: str, revision: int) -> None:
        out["aggregate_id"] = self._id_prefix + dims_key
        out["dimensions"] = dict(dims)
        out["dims_key"] = dims_key
        out["revision"] = revision


# the names `result` gives a calls aggregate (its model_fields_set, with the blank's)
_CALL_NAMES = fields_set_of(CallAccumulator().result(1, 0, {}, "*").model_fields_set)
