"""The aggregates topic's bytes (a public contract, DESIGN.md): `encode_aggregate`, the worker's
way to write them, writes every aggregate byte for byte as `codec.encode` does, values that
JSON writers tend to write differently (floats of 1e16 and above, infinities, odd strings) included."""

from __future__ import annotations

import math
import random
import struct
from datetime import UTC, datetime

import msgspec
import pytest
from pydantic_core import PydanticSerializationError

from llmpulse.schemas import WindowAggregate
from llmpulse.schemas.aggregate_wire import WireAggregate, encode_aggregate
from llmpulse.schemas.codec import encode
from tests.test_accumulators import T0_MS, accumulators

FLOAT_FIELDS = [
    name for name, f in WindowAggregate.model_fields.items()
    if f.annotation is not None and "float" in str(f.annotation)
]  # fmt: skip


def odd_floats(rnd: random.Random) -> list[float]:
    fixed = [0.0, 1e16, 1e15, 9.999999999999998e15, 1e17, 1.5e300, 1.7976931348623157e308, 1e-7, 5e-324,
             0.1, 100.0, 2.0**53 + 2, math.inf, math.nan, 123456789012345680.0, 1e-5, 12.5]  # fmt: skip
    bits = [struct.unpack("d", struct.pack("Q", rnd.getrandbits(64)))[0] for _ in range(200)]
    scaled = [rnd.random() * 10 ** rnd.randint(-9, 30) for _ in range(400)]
    return fixed + [abs(x) for x in bits] + scaled


def test_every_kinds_aggregate_is_written_as_codec_writes_it() -> None:
    for acc in accumulators():
        for dims, dk in (({}, "*"), ({"model": "gpt-4e5", "app": 'a "quoted" \\ app'}, "x"), ({"user": "é\u2028\x00\x7f😀"}, "y")):
            agg = acc.result(60, T0_MS, dims, dk, revision=2)
            assert encode_aggregate(agg) == encode(agg), acc.kind
            agg.revision = 3  # set after it was built, as a re-publication does
            assert encode_aggregate(agg) == encode(agg), acc.kind


def test_floats_of_every_magnitude_are_written_as_codec_writes_them() -> None:
    rnd = random.Random(15)
    base = accumulators()[0].result(10, T0_MS, {"model": "m"}, "model=m")
    for value in odd_floats(rnd):
        for name in rnd.sample(FLOAT_FIELDS, 3):
            agg = base.model_copy(update={name: value})
            assert encode_aggregate(agg) == encode(agg), (name, value)


def test_a_validated_aggregate_is_written_alike() -> None:
    agg = WindowAggregate(aggregate_id="a", kind="gpu", window_s=60, window_start=datetime(2026, 3, 1, tzinfo=UTC),
                          window_end=datetime(2026, 3, 1, 0, 1, tzinfo=UTC), samples=4, gpu_util_max_pct=2.5e17,
                          temperature_max_c=61.0)  # fmt: skip
    assert encode_aggregate(agg) == encode(agg)
    assert b'"gpu_util_max_pct":2.5e+17' in encode_aggregate(agg)


def test_a_value_it_cannot_write_fails_as_it_did() -> None:
    agg = accumulators()[0].result(10, T0_MS, {"model": "\ud800"}, "model=?")  # a lone surrogate
    with pytest.raises(PydanticSerializationError):
        encode(agg)
    with pytest.raises(PydanticSerializationError):
        encode_aggregate(agg)


def test_the_worker_s_aggregates_are_written_by_msgspec() -> None:
    """The fast path is the one taken (else the speed is pydantic's again, silently): every kind's
    aggregate converts to the wire struct without error."""
    for acc in accumulators():
        agg = acc.result(60, T0_MS, {"model": "m"}, "model=m", revision=2)
        wire = msgspec.convert(agg.__dict__, WireAggregate)
        assert msgspec.json.encode(wire) == encode(agg), acc.kind


def test_the_wire_struct_mirrors_the_model() -> None:
    assert WireAggregate.__struct_fields__ == tuple(WindowAggregate.model_fields)
    wire_floats = [n for n in WireAggregate.__struct_fields__ if "float" in WireAggregate.__annotations__[n].lower()]
    assert wire_floats == FLOAT_FIELDS


@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings")
def test_values_not_of_their_field_s_type_are_written_as_codec_writes_them() -> None:
    base = accumulators()[0].result(10, T0_MS, {"model": "m"}, "model=m")
    for name, value in (("latency_sum_ms", 5), ("cost_usd", 10**20), ("qps", True), ("requests", 5.0),
                        ("requests", 2**70), ("ttft_sum_ms", -1e17), ("error_rate", -0.0)):  # fmt: skip
        agg = base.model_copy()
        agg.__dict__[name] = value  # unvalidated, as of_fields takes values
        assert encode_aggregate(agg) == encode(agg), (name, value)
