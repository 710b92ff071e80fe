"""The ClickHouse sink in-process, against the real broker and a real chDB store.

- ClickHouse unavailable: INSERTs fail at the client boundary with the driver's own
  errors (the sink's code is untouched); the sink pauses, retries, and loses nothing.
- An acknowledgement lost after the INSERT landed: the retry carries the same token and
  counts nothing twice.
- A crash in the middle of an INSERT (raw rows and the per-minute roll-up stored, the
  hourly roll-up chained from it not yet) and before the commit: the next sink rebuilds
  that batch from Kafka and completes the roll-up, counting nothing twice.
- Events produced again at new offsets (a producer's retry or resend): in one message, in
  the same batch, in later batches: every roll-up counts each event once; a batch whose
  INSERT stopped half-way is rebuilt leaving out exactly what its first write left out.
- The actions topic lands in the `actions` table.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from llmpulse.config import Settings
from llmpulse.embedded.store import Store
from llmpulse.schemas import CallEvent, encode, encode_batch
from llmpulse.schemas.action import ActionEvent
from llmpulse.sinks.clickhouse.migrate import open_migrated
from llmpulse.sinks.clickhouse.rows import TABLES
from llmpulse.sinks.clickhouse.sink import ClickHouseSink
from llmpulse.sinks.clickhouse.steps.model import Batch
from llmpulse.sinks.clickhouse.writer import BatchWriter, time_spans
from tests.kafkatools import produce

FAST = {"sink.batch_seconds": 0.2, "sink.retry_initial_s": 0.05, "sink.retry_max_s": 0.2}


def calls(n: int, prefix: str) -> list[CallEvent]:
    t0 = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=30)
    return [
        CallEvent(event_id=f"{prefix}{i:06d}", ts=t0 + timedelta(seconds=i), model=f"m{i % 3}", app="a",
                  status_code=500 if i % 10 == 0 else 200, latency_ms=float(i % 1000), prompt_tokens=i % 100,
                  completion_tokens=1, cost_usd=0.000123)
        for i in range(n)
    ]  # fmt: skip


def send(settings: Settings, events: list[CallEvent], per_message: int = 50) -> None:
    produce(
        settings.kafka.bootstrap_servers(),
        settings.kafka.topic("calls"),
        [(events[i].model, encode_batch(events[i : i + per_message])) for i in range(0, len(events), per_message)],
    )


def figures(client: Any) -> tuple[int, int, int, int]:
    """Raw rows (no FINAL: duplicates would show), and requests in the 1m and 1h roll-ups; errors in 1m."""
    raw = client.query("SELECT count() FROM llmpulse.llm_calls").result_rows[0][0]
    m = client.query("SELECT countMerge(requests), sumMerge(errors) FROM llmpulse.llm_calls_1m").result_rows[0]
    h = client.query("SELECT countMerge(requests) FROM llmpulse.llm_calls_1h").result_rows[0][0]
    return int(raw), int(m[0]), int(h), int(m[1])


def wait(cond: Callable[[], bool], timeout: float = 90) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


ROLLUPS = ("llm_calls_1m", "llm_calls_1h", "llm_calls_1m_total", "llm_calls_1h_total")


def rolled_up(client: Any, table: str) -> dict[tuple[Any, ...], tuple[int, int, int, int]]:
    """A roll-up's requests, errors, tokens and cost (nano-dollars) per bucket (and model, app)."""
    dims = "" if table.endswith("_total") else ", model, app"
    rows = client.query(f"SELECT toUnixTimestamp(bucket){dims}, countMerge(requests), sumMerge(errors), "
                        f"sumMerge(tokens_total), toInt64(sumMerge(cost) * 1000000000) FROM llmpulse.{table} "
                        f"GROUP BY bucket{dims}").result_rows  # fmt: skip
    return {tuple(r[:-4]): (int(r[-4]), int(r[-3]), int(r[-2]), int(r[-1])) for r in rows}


def true_rollup(events: list[CallEvent], table: str) -> dict[tuple[Any, ...], tuple[int, int, int, int]]:
    """The same from the events, each event id once."""
    size = 60 if "_1m" in table else 3600
    acc: dict[tuple[Any, ...], list[int]] = {}
    for e in {e.event_id: e for e in events}.values():
        bucket = int(e.ts.timestamp()) // size * size
        a = acc.setdefault((bucket,) if table.endswith("_total") else (bucket, e.model, e.app), [0, 0, 0, 0])
        a[0] += 1
        a[1] += int(e.is_error)
        a[2] += e.total_tokens or 0
        a[3] += round((e.cost_usd or 0) * 1e9)
    return {k: (v[0], v[1], v[2], v[3]) for k, v in acc.items()}


@contextmanager
def store_of(settings: Settings) -> Iterator[Store]:
    store, _ = open_migrated(settings.clickhouse, settings.data_dir)  # as `llmpulse sink` opens it
    try:
        yield store
    finally:
        store.close()


@contextmanager
def running(sink: ClickHouseSink) -> Iterator[ClickHouseSink]:
    t = threading.Thread(target=sink.run, kwargs={"drain_quiet_s": 0.3}, daemon=True)
    t.start()
    try:
        yield sink
    finally:
        sink.stop()
        t.join(60)
        assert not t.is_alive()


class FlakyClient:
    """The real clickhouse-connect client, whose INSERTs fail with the driver's errors on demand."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.down = False
        self.lose_ack = 0  # this many INSERTs land, then raise as if the connection dropped
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def _guard(self) -> None:
        if self.down:
            self.failures += 1
            raise OperationalError("Error HTTPConnectionPool(host='clickhouse', port=8123): connection refused")

    def insert(self, *args: Any, **kwargs: Any) -> Any:
        self._guard()
        return self._client.insert(*args, **kwargs)

    def raw_insert(self, *args: Any, **kwargs: Any) -> Any:
        self._guard()
        result = self._client.raw_insert(*args, **kwargs)
        if self.lose_ack > 0:
            self.lose_ack -= 1
            self.failures += 1
            raise DatabaseError("Code: 210. DB::NetException: Connection reset by peer, while reading from socket")
        return result


def test_clickhouse_unavailable_then_back_loses_nothing(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(**FAST)
    with store_of(settings) as store:
        flaky = FlakyClient(store.client)
        sink = ClickHouseSink(settings, settings.kafka.bootstrap_servers(), flaky)
        first, second = calls(3000, "a"), calls(3000, "b")
        with running(sink):
            send(settings, first)
            assert wait(lambda: figures(store.client)[0] == 3000)
            flaky.down = True
            send(settings, second)
            assert wait(lambda: sink.paused and flaky.failures >= 3)  # backpressure while failing
            time.sleep(1.0)
            assert figures(store.client)[0] == 3000
            flaky.lose_ack = 1  # when it comes back, the first INSERT lands but its answer is lost
            flaky.down = False
            assert wait(lambda: figures(store.client)[0] >= 6000)
            time.sleep(0.5)
        assert not sink.paused
        assert figures(store.client) == (6000, 6000, 6000, 600)
        assert flaky.lose_ack == 0


def test_crash_inside_an_insert_is_completed_by_the_next_sink(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(**{"sink.batch_seconds": 3600.0, "sink.batch_rows": 1_000_000})
    bootstrap = settings.kafka.bootstrap_servers()
    topic = settings.kafka.topic("calls")
    events = calls(2000, "c")
    send(settings, events)
    with store_of(settings) as store:
        a = ClickHouseSink(settings, bootstrap, store.client)
        a.start()
        buf = a.buffers[topic]
        assert wait(lambda: a.poll_once(0.2) >= 0 and len(buf.items) == 2000)
        # what the write step does, stopped half-way: the batch is recorded, its INSERT
        # reaches llm_calls and the per-minute roll-up but not the hourly one (fed by a view on
        # the per-minute roll-up: the second link of the chain), and nothing is committed
        spec = TABLES["calls"]
        ranges = [(p, r[0], r[1]) for p, r in sorted(buf.ranges.items())]
        a.writer.record_intent(spec, topic, buf.token(), ranges, len(buf.items))
        store.client.command("DETACH TABLE llmpulse.llm_calls_1h_mv")
        a.writer.insert(spec, buf.items, buf.token())
        store.client.command("ATTACH TABLE llmpulse.llm_calls_1h_mv")
        buf.clear()
        a.consumer.close()
        assert figures(store.client) == (2000, 2000, 0, 200)

        quick = settings.model_copy(update={"sink": settings.sink.model_copy(update={"batch_seconds": 0.2})})
        b = ClickHouseSink(quick, bootstrap, store.client)
        with running(b):
            assert wait(lambda: figures(store.client)[1] >= 2000)
            send(settings, calls(10, "d"))  # new events after the rebuilt batch are written as usual
            assert wait(lambda: figures(store.client)[0] >= 2010)
        assert b.replayed_batches == 1
        assert figures(store.client) == (2010, 2010, 2010, 201)


def test_events_produced_again_at_new_offsets_are_rolled_up_once(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(**FAST)
    events = calls(3000, "u")
    doubled = [e for e in events[1000:1100] for _ in (0, 1)]  # each one twice within the same message
    send(settings, events[:1000] + events[500:1000] + doubled)  # copies at new offsets before the sink reads
    with store_of(settings) as store:
        sink = ClickHouseSink(settings, settings.kafka.bootstrap_servers(), store.client)
        with running(sink):
            assert wait(lambda: figures(store.client)[0] >= 1100)
            send(settings, events[1100:3000])
            assert wait(lambda: figures(store.client)[0] >= 3000)
            send(settings, events[::7] + events[2900:])  # later batches: copies of events long written
            extra = calls(3100, "u")[3000:]
            send(settings, events[2950:] + extra)  # copies beside new events
            assert wait(lambda: figures(store.client)[0] >= 3100)
        everything = events + extra
        raw = store.client.query("SELECT count(), uniqExact(event_id) FROM llmpulse.llm_calls").result_rows
        assert raw == [(3100, 3100)]  # no copy reached the table at all, even before merges
        for table in ROLLUPS:
            assert rolled_up(store.client, table) == true_rollup(everything, table), table


def test_a_rebuilt_batch_leaves_out_what_its_first_write_left_out(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(**{"sink.batch_seconds": 3600.0, "sink.batch_rows": 1_000_000})
    bootstrap = settings.kafka.bootstrap_servers()
    topic = settings.kafka.topic("calls")
    spec = TABLES["calls"]
    events = calls(2000, "r")
    send(settings, events[:1000])
    with store_of(settings) as store:
        a = ClickHouseSink(settings, bootstrap, store.client)
        a.start()
        assert wait(lambda: a.poll_once(0.2) >= 0 and a.buffered == 1000)
        a.join()  # written and committed
        # then copies of 500 of those at new offsets, 1000 new events, 100 of which twice
        send(settings, events[500:1000] + events[1000:2000] + events[1500:1600])
        assert wait(lambda: a.poll_once(0.2) >= 0 and a.buffered == 1600)
        buf = a.buffers[topic]
        batch = Batch(topic, spec, buf.items, buf.token(), {p: (r[0], r[1]) for p, r in buf.ranges.items()})
        buf.clear()
        # the write step records the batch and INSERTs it, but the INSERT stops half-way (the
        # hourly roll-ups, fed from the per-minute ones, do not get it) and nothing is committed
        store.client.command("DETACH TABLE llmpulse.llm_calls_1h_mv")
        a.write.submit(batch)
        a.write.join()
        store.client.command("ATTACH TABLE llmpulse.llm_calls_1h_mv")
        a.consumer.close()
        skipped = store.client.query("SELECT skipped_ids FROM llmpulse.sink_intents FINAL WHERE token = {t:String}",
                                     parameters={"t": batch.token}).result_rows  # fmt: skip
        assert sorted(skipped[0][0]) == sorted(e.event_id for e in events[500:1000])
        assert figures(store.client) == (2000, 2000, 1000, 200)

        # the next sink rebuilds it from Kafka: the same rows (all already in llm_calls) under the same token
        quick = settings.model_copy(update={"sink": settings.sink.model_copy(update={"batch_seconds": 0.2})})
        b = ClickHouseSink(quick, bootstrap, store.client)
        with running(b):
            assert wait(lambda: figures(store.client)[2] >= 2000)
            time.sleep(0.5)
        assert b.replayed_batches == 1
        assert figures(store.client) == (2000, 2000, 2000, 200)
        for table in ROLLUPS:
            assert rolled_up(store.client, table) == true_rollup(events, table), table


def test_the_presence_lookup_reads_the_batch_s_seconds_or_falls_back_to_its_ids(make_settings: Callable[..., Settings]) -> None:
    t0 = datetime(2026, 11, 30, 12, tzinfo=UTC)
    # live traffic and two stragglers from an hour before: three short spans, not the hour between
    stamps = [t0 + timedelta(milliseconds=10 * i) for i in range(300)] + [t0 - timedelta(hours=1), t0 - timedelta(minutes=59)]
    start = int(t0.timestamp())
    assert time_spans(stamps) == [(start - 3600, start - 3599), (start - 3540, start - 3539), (start, start + 3)]
    assert len(time_spans([t0 + timedelta(seconds=10 * i) for i in range(100)], most=4)) == 4
    settings = make_settings()
    spec = TABLES["calls"]
    with store_of(settings) as store:
        writer = BatchWriter(store.client, "llmpulse")
        busy = [CallEvent(event_id=f"busy{i}", ts=t0 + timedelta(microseconds=i * 30), model="m", latency_ms=1.0)
                for i in range(25_000)]  # fmt: skip
        writer.insert(spec, busy, "busy")
        # 3 events in the busiest second: 25,000 rows there, more than reading them is worth
        probe = [busy[5], busy[24_999], CallEvent(event_id="elsewhere", ts=busy[7].ts, model="m", latency_ms=1.0)]
        assert writer.present_ids(spec, probe) == {"busy5", "busy24999"}
        # 30,000 events of that second: its rows are read and matched here
        assert writer.present_ids(spec, busy[:20_000] + probe * 3_334) == {f"busy{i}" for i in range(20_000)} | {"busy24999"}


def test_actions_are_written(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(**FAST)
    steps = [
        ActionEvent(action_id="act1", status=s, kind="rate_limit", rule="limit-key", alert_fingerprint="fp",
                    target={"api_key_hash": "h1"}, params={"rpm": 10}, ts=datetime(2026, 1, 1, 0, i, tzinfo=UTC))
        for i, s in enumerate(("proposed", "approved", "applied"))
    ]  # fmt: skip
    produce(settings.kafka.bootstrap_servers(), settings.kafka.topic("actions"), [(b"act1", encode(s)) for s in steps])
    with store_of(settings) as store:
        sink = ClickHouseSink(settings, settings.kafka.bootstrap_servers(), store.client)
        with running(sink):
            assert wait(lambda: store.client.query("SELECT count() FROM llmpulse.actions").result_rows[0][0] >= 3)
        rows = store.client.query(
            "SELECT status, target['api_key_hash'], params FROM llmpulse.actions FINAL ORDER BY ts"
        ).result_rows
        assert [(r[0], r[1]) for r in rows] == [("proposed", "h1"), ("approved", "h1"), ("applied", "h1")]
        assert rows[0][2] == '{"rpm": 10}'


@pytest.mark.parametrize("raw", [b'{"model": "m", "ts": "2026-01-01T00:00:00"}', b'{"model": "m", "x": 1}'])
def test_fast_decoder_defers_to_pydantic(raw: bytes) -> None:
    # a naive timestamp and an unknown field are invalid for CallEvent: the sink skips them
    from llmpulse.sinks.clickhouse.calls import decode_calls

    assert decode_calls(raw) == ([], 1)
    items, bad = decode_calls(b'{"model": "m", "ts": "2026-01-01T00:00:00+02:00", "status_code": 404}')
    assert bad == 0 and items[0].ts == datetime(2025, 12, 31, 22, tzinfo=UTC) and items[0].total_tokens == 0
    lax, bad = decode_calls(b'{"model": "m", "prompt_tokens": "12"}')  # pydantic's lax mode accepts "12"
    assert bad == 0 and lax[0].prompt_tokens == 12
