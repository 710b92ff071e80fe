"""The worker's internal `partials` topic: what stage 1 tells stage 2, format and parse side by side.

Stage 1 (one source partition) sends, for each closed window, one `WindowPartials`
message holding every dimension set of that window it saw (split in chunks of at most
`MAX_SETS_PER_MESSAGE` sets, so that a window of many users stays far below a broker's
message size limit), then its `CloseMark`. Stage 2 merges the windows of all source
partitions (llmpulse.streams.finalizing).

One message per window and source, not per dimension set: the cost of a closed window
then does not grow with the number of its dimension values (issue 15).

Messages of the previous version (one `{"type": "partial", ...}` per window and
dimension set) still parse, as `LegacyPartial`: a worker upgraded while such messages
wait on the topic merges them as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

MAX_SETS_PER_MESSAGE = 1000


class DimensionSetState(msgspec.Struct, array_like=True, gc=False):
    """One dimension set of a window: its canonical key, its values, the accumulator state."""

    dims_key: str
    dims: dict[str, str]
    state: dict[str, Any]


class _WindowHeader(msgspec.Struct, kw_only=True, gc=False):
    """What a partials message says of its window, whichever way its sets are decoded."""

    kind: str
    window_s: int
    start_ms: int
    source: str
    chunk: int = 0
    chunks: int = 1

    @property
    def end_ms(self) -> int:
        return self.start_ms + self.window_s * 1000


class WindowPartials(_WindowHeader, tag="partials", tag_field="type", kw_only=True):
    """The dimension sets of one closed window of one source partition (chunk `chunk` of `chunks`)."""

    sets: list[DimensionSetState]


class LegacyPartial(msgspec.Struct, tag="partial", tag_field="type", gc=False):
    """A partial of the previous version: one window and one dimension set."""

    kind: str
    s: int
    t: int
    dims: dict[str, str]
    dk: str
    src: str
    state: dict[str, Any]

    def upgrade(self) -> WindowPartials:
        return WindowPartials(
            kind=self.kind, window_s=self.s, start_ms=self.t, source=self.src, chunk=-1, chunks=0,
            sets=[DimensionSetState(self.dk, self.dims, self.state)],
        )  # fmt: skip


class CloseMark(msgspec.Struct, tag="mark", tag_field="type", gc=False):
    """Every window of `kind` ending at or before `mark` (ms) is closed in source `src`;
    None: the source has seen no event yet (it holds no window back)."""

    kind: str
    src: str
    mark: int | None


class ReceivedSet(msgspec.Struct, array_like=True, gc=False):
    """A `DimensionSetState` as stage 2 decodes it: the state left as its JSON text, decoded
    only when its window is published (`llmpulse.streams.accumulators`, `decode_call_state`)."""

    dims_key: str
    dims: dict[str, str]
    state: msgspec.Raw


class ReceivedPartials(_WindowHeader, tag="partials", tag_field="type", kw_only=True):
    """A `WindowPartials` as stage 2 decodes it (its sets' states left as JSON text)."""

    sets: list[ReceivedSet]


PartialsMessage = WindowPartials | LegacyPartial | CloseMark

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(PartialsMessage)


def encode_partials(msg: WindowPartials | CloseMark) -> bytes:
    return _encoder.encode(msg)


def decode_partials(raw: bytes) -> WindowPartials | CloseMark:
    """One message of the partials topic; a legacy partial comes back upgraded (chunk -1).

    Raises msgspec.DecodeError (a ValueError) for anything else."""
    msg = _decoder.decode(raw)
    return msg.upgrade() if isinstance(msg, LegacyPartial) else msg


_received_decoder = msgspec.json.Decoder(ReceivedPartials | LegacyPartial | CloseMark)


def decode_received(raw: bytes) -> ReceivedPartials | WindowPartials | CloseMark:
    """`decode_partials`, the sets' states left as their JSON text (a legacy partial comes back
    upgraded, its state decoded). Decoding every state into dicts on receipt cost stage 2 more
    than merging them: most are read once, when their window is published."""
    msg = _received_decoder.decode(raw)
    return msg.upgrade() if isinstance(msg, LegacyPartial) else msg


_sets_decoder = msgspec.json.Decoder(list[DimensionSetState])
_received_sets_decoder = msgspec.json.Decoder(list[ReceivedSet])
_state_decoder = msgspec.json.Decoder(dict[str, Any])


def encode_sets(sets: Sequence[DimensionSetState | ReceivedSet]) -> str:
    """A message's dimension sets as stage 2 stores them (`<fp>|W|...` in state_keys.py): one
    JSON text, not a tree of dicts. A table value is held in memory for the whole backfill
    retention; the text of a set's state is about 350 bytes, its decoded dicts about 2 KB."""
    return _encoder.encode(sets).decode()


def decode_sets(text: str) -> list[DimensionSetState]:
    return _sets_decoder.decode(text)


def decode_received_sets(text: str) -> list[ReceivedSet]:
    """`decode_sets`, the states left as their JSON text."""
    return _received_sets_decoder.decode(text)


def pack_state(state: dict[str, Any]) -> bytes:
    """An accumulator state kept compact while nothing reads it (a published window's parts)."""
    return _encoder.encode(state)


def unpack_state(packed: dict[str, Any] | bytes) -> dict[str, Any]:
    return _state_decoder.decode(packed) if isinstance(packed, bytes) else packed


class SketchState(msgspec.Struct, gc=False):
    """`QuantileSketch.to_state` (llmpulse.streams.sketch): bins by key, zeros, count."""

    b: dict[int, int] = {}
    z: int = 0
    n: int = 0


class CallState(msgspec.Struct, kw_only=True, gc=False):
    """`CallAccumulator.to_state` (llmpulse.streams.accumulators), typed, both ways:
    - decoded: stage 2 merges these without the dicts' per-key conversions. A float sum keeps
      the type its JSON has (`int | float`), as a decoded dict keeps it; `tf` is absent from
      states written before the TTFT sum was kept (hence its default, and `kw_only`, which
      lets a field with a default come before those without);
    - encoded (`CallAccumulator.state_to_encode`): the fields in `to_state`'s key order, so
      msgspec writes the very text `json.dumps(to_state())` writes, without building its
      dicts and copying its bins. Stage 1 writes one per accumulator that changed in a
      batch (window_state.py): nearly one per event at many users."""

    r: int
    e: int
    et: dict[str, int]
    ls: int | float
    l: SketchState  # noqa: E741 (the state's own key)
    t: SketchState
    tf: int | float = 0.0
    p: int
    c: int
    tt: int
    cn: int
    u: int

    def merge(self, o: CallState) -> None:
        """`o` added into this state: `CallAccumulator.merge` (llmpulse.streams.accumulators) on
        states, the float sums and the dicts' keys added in the same order (same sums, same dict
        order). Stage 2 merges a dimension set's parts with this, in the order of their sources
        (finalizing._by_source); `o` is left as it was. Only what can hold something is read: error types come only with errors
        (agg and merge add both), and a sketch's count is its zeros and binned values, so a
        TTFT sketch of count 0 (no streamed call: most) holds nothing."""
        self.r += o.r
        if o.e:
            self.e += o.e
            err_types = self.et
            for t, n in o.et.items():
                err_types[t] = err_types.get(t, 0) + n
        self.ls += o.ls
        # the sketches' `QuantileSketch.merge` written out (no call per sketch)
        mine, other = self.l, o.l
        mine.n += other.n
        mine.z += other.z
        bins = mine.b
        for key, n in other.b.items():
            bins[key] = bins.get(key, 0) + n
        other = o.t
        if other.n:
            mine = self.t
            mine.n += other.n
            mine.z += other.z
            bins = mine.b
            for key, n in other.b.items():
                bins[key] = bins.get(key, 0) + n
        self.tf += o.tf
        self.p += o.p
        self.c += o.c
        self.tt += o.tt
        self.cn += o.cn
        self.u += o.u


decode_call_state = msgspec.json.Decoder(CallState).decode
"""A packed calls state (bytes) as a `CallState`; a msgspec.ValidationError (a ValueError) if it is none."""


class AccStateText(msgspec.Struct, gc=False):
    """`PartitionWindows.acc_state` to encode (`acc_state_to_encode`): an accumulator of a
    stage-1 W record (window_state.py), the last offset it absorbed and its state
    (`Accumulator.state_to_encode`), the same text as the dict's."""

    o: int
    a: Any


def window_messages(
    kind: str, window_s: int, start_ms: int, source: str, sets: list[DimensionSetState]
) -> list[WindowPartials]:
    """The messages of one window of one source: its sets in chunks, in a fixed order."""
    n = max(1, -(-len(sets) // MAX_SETS_PER_MESSAGE))
    return [
        WindowPartials(
            kind=kind, window_s=window_s, start_ms=start_ms, source=source, chunk=i, chunks=n,
            sets=sets[i * MAX_SETS_PER_MESSAGE : (i + 1) * MAX_SETS_PER_MESSAGE],
        )
        for i in range(n)
    ]
