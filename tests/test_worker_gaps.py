"""The worker never skips a source offset, whatever its consumer is told.

Around rebalances Faust's consumer was seen to jump forward within a partition,
dropping the messages in between as already read and committing past them
(llmpulse/streams/contiguity.py). This test creates that situation on purpose with the
real broker and the real `llmpulse worker`: the worker is killed mid-stream, and its
state is then rewound (on its changelog) to what it was halfway through, so that the
group's committed offsets lie far past what the state holds. On restart the consumer
starts after a gap; the worker must notice, go back to the first offset its state
lacks, and count every event exactly once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from llmpulse.config import Settings
from llmpulse.schemas import CallEvent, encode, encode_batch
from llmpulse.streams.contiguity import OffsetGuard
from llmpulse.streams.positions import BATCH_SLOTS
from tests.kafkatools import read_messages
from tests.pipeline import Component, settings_from, write_config
from tests.test_worker_e2e import MODELS, latest_aggregates, per_model, truth


def produce_recording(bootstrap: str, topic: str, values: list[tuple[str, bytes]]) -> dict[int, list[int]]:
    """Produce, returning the offsets each partition received."""
    got: dict[int, list[int]] = {}
    failed: list[str] = []

    def done(err: Any, msg: Any) -> None:
        if err is not None:
            failed.append(str(err))
        else:
            got.setdefault(msg.partition(), []).append(msg.offset())

    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "log_level": 3})
    for key, value in values:
        p.produce(topic, key=key, value=value, on_delivery=done)
        p.poll(0)
    assert p.flush(30) == 0 and not failed, failed[:3]
    return got


def rewind_state(bootstrap: str, changelog: str) -> dict[int, int]:
    """Make each partition's window state what it was halfway through the first run.

    The changelog is read whole; for each partition the state as of its middle meta record
    (the fold of every record before it) is written back on top, key by key, tombstones
    for keys that did not exist then. A restore now yields that older state, while the
    group's committed offsets stay where the killed worker left them: far ahead.
    Returns the partition's applied message offset in the rewound state."""
    msgs = read_messages(bootstrap, changelog, timeout=15, until=lambda out: False)
    by_partition: dict[int, list[Any]] = {}
    for m in msgs:
        by_partition.setdefault(m.partition(), []).append(m)
    writes: list[tuple[int, bytes, bytes | None]] = []
    rewound: dict[int, int] = {}
    for p, records in by_partition.items():
        metas = [i for i, m in enumerate(records) if m.value() is not None and json.loads(m.key()).endswith("|M")]
        if len(metas) < 4:
            continue
        cut = metas[len(metas) // 2]
        then: dict[bytes, bytes] = {}
        for m in records[: cut + 1]:
            if m.value() is None:
                then.pop(m.key(), None)
            else:
                then[m.key()] = m.value()
        for key in {m.key() for m in records}:
            writes.append((p, key, then.get(key)))
        rewound[p] = json.loads(records[cut].value())["o"] // BATCH_SLOTS
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "log_level": 3})
    for p, key, value in writes:
        producer.produce(changelog, key=key, value=value, partition=p)
    assert producer.flush(30) == 0
    return rewound


@pytest.mark.e2e
def test_committed_offsets_past_the_state_lose_nothing(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    config = write_config(tmp_path / "llmpulse.yaml", make_settings(), worker__grace_s=5.0, worker__idle_close_s=120.0,
                          worker__batch_max_messages=5)  # small batches: many states to rewind to
    settings = settings_from(config)
    bootstrap = settings.kafka.bootstrap_servers()
    topic = settings.kafka.topic("calls")
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    n = 20_000
    events = [
        CallEvent(event_id=f"g{i}", ts=t0 + timedelta(milliseconds=i * 3), model=MODELS[i % 5],
                  status_code=200, prompt_tokens=i % 50, completion_tokens=3, latency_ms=10 + i % 40)
        for i in range(n)
    ]  # fmt: skip
    data_end = events[-1].ts.timestamp()
    msgs: list[tuple[str, bytes]] = []
    for i in range(0, n, 100):
        by: dict[str, list[CallEvent]] = {}
        for e in events[i : i + 100]:
            by.setdefault(e.model, []).append(e)
        msgs += [(m, encode_batch(g)) for m, g in by.items()]
    first = len(msgs) // 3
    worker = Component(config, "worker", log=tmp_path / "worker1.log").start()
    try:
        produce_recording(bootstrap, topic, msgs[:first])
        read_messages(bootstrap, settings.kafka.topic("aggregates"), expect=10, timeout=90)
        worker.kill()
        produce_recording(bootstrap, topic, msgs[first:])
        # the state goes back to the middle of the first run; the committed offsets stay ahead
        rewound = rewind_state(bootstrap, f"{settings.kafka.topic_prefix}worker-windows-changelog")
        assert rewound, "the first run must have left state to rewind"
        closers = [(m, encode(CallEvent(event_id=f"close-{m}", ts=events[-1].ts + timedelta(seconds=120), model=m)))
                   for m in MODELS]  # fmt: skip
        produce_recording(bootstrap, topic, closers)
        worker = Component(config, "worker", log=tmp_path / "worker2.log").start()
        latest = latest_aggregates(
            bootstrap, settings.kafka.topic("aggregates"),
            until=lambda lat: sum(v[0] for v in per_model(lat, 2, data_end).values()) >= n, timeout=150,
        )  # fmt: skip
        time.sleep(2)
        assert per_model(latest, 2, data_end) == truth(events, 2)
        assert per_model(latest, 10, data_end) == truth(events, 10)
        assert "skipped by the consumer; going back" in worker.output()
    finally:
        worker.stop()


def test_guard_admits_contiguous_offsets_and_redeliveries() -> None:
    g = OffsetGuard()
    assert g.admit("p", None, [5, 6, 7], 0.0).take == 3  # no state yet: anything starts it
    assert g.admit("p", 7, [8, 9, 10], 0.0).take == 3
    adm = g.admit("p", 10, [4, 5, 11, 11, 12], 0.0)  # re-delivered ones are left to the state to skip
    assert (adm.take, adm.seek_to) == (5, None)


def test_guard_cuts_at_a_gap_waits_for_the_missing_offset_and_resumes() -> None:
    g = OffsetGuard(reseek_s=2.0)
    adm = g.admit("p", 10, [11, 12, 20, 21], 0.0)
    assert (adm.take, adm.seek_to) == (2, 13)
    # still buffered from before the seek: dropped, no second seek yet
    adm = g.admit("p", 12, [22, 23], 0.5)
    assert (adm.take, adm.seek_to) == (0, None)
    # the seek has not taken effect after reseek_s: seek again
    adm = g.admit("p", 12, [24], 2.6)
    assert (adm.take, adm.seek_to) == (0, 13)
    # the missing offset arrives: everything from it is taken
    adm = g.admit("p", 12, [13, 14, 15], 3.0)
    assert (adm.take, adm.seek_to) == (3, None)
    assert g.rewinds == {} and g.gaps_seen == 1 and g.gaps_accepted == 0


def test_guard_accepts_a_gap_that_holds_no_messages_after_several_seeks() -> None:
    g = OffsetGuard(reseek_s=1.0, accept_after_s=5.0, accept_after_seeks=3)
    t = 0.0
    adm = g.admit("p", 10, [13, 14], t)  # 11 and 12 are transaction markers: they never arrive
    assert adm.seek_to == 11
    seeks = 1
    while True:
        t += 1.1
        adm = g.admit("p", 10, [13, 14], t)
        if adm.take == 2:
            break
        assert adm.seek_to == 11
        seeks += 1
        assert t < 20
    assert seeks >= 3 and t >= 5.0 and g.gaps_accepted == 1
    assert g.admit("p", 14, [15], t).take == 1


def test_guard_seeks_again_from_the_timer_when_nothing_arrives() -> None:
    g = OffsetGuard(reseek_s=2.0)
    assert g.admit(("calls", 3), 506, [515, 516], 0.0).seek_to == 507
    assert g.due_reseeks(1.0) == []
    assert g.due_reseeks(2.5) == [(("calls", 3), 507)]
    assert g.due_reseeks(3.0) == []  # not again before reseek_s
    assert g.admit(("calls", 3), 506, [507, 508], 3.1).take == 2
    assert g.due_reseeks(10.0) == []
