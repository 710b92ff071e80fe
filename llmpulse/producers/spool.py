"""A publisher that never blocks, never fails the caller, and loses nothing while it can spool.

``publish_raw()`` appends to a bounded in-memory queue (a deque; O(1), thread-safe)
and returns. A background thread hands the queue to confluent-kafka's producer.
When the broker is unreachable (librdkafka reports all brokers down, or a message
is not delivered within `delivery_timeout_s`), events go to the spool instead: an
append-only file ``<spool_dir>/spool.bin`` (the proxy), or the same records in
memory (``spool_dir=None``: the in-app SDK, which writes no files). The thread
probes the broker every `retry_s` and, once it answers, replays the spool from the
last replayed offset (kept in ``spool.offset``, so a restarted process replays what
an earlier one spooled). Only when the unreplayed spool would exceed
`spool_max_bytes` is an event dropped, and each drop is counted
(``llmpulse_publish_dropped_total``).

An acknowledgement is not yet safety. A broker asked to stop keeps answering its
open connections until it exits (Tansu, the embedded broker, acknowledges produce
requests for about 5 s after SIGTERM), and a broker that keeps messages in memory
only (Tansu again) loses what it acknowledged when it exits. So every delivered
message is held for `hold_s` (default: the delivery timeout) after its
acknowledgement; when the broker goes down (all brokers down, or a delivery fails),
the messages acknowledged within the last `hold_s` are spooled again and replayed
with the rest. This is the failure measured before: events published while the
broker stopped were acknowledged, counted in ``llmpulse_events_out_total`` and then
gone with the broker, never spooled and never counted as dropped.

A process killed (SIGKILL, OOM) while events wait in memory loses nothing either: the
proxy's publisher keeps an in-flight log (``<spool_dir>/inflight/``, see InflightLog)
holding each event from the moment the caller accepted it (``log_accepted``: the proxy
logs a call's event before answering the call, then holds it in its batch buffer) and
each other message from the moment it is handed to librdkafka, until the message
carrying it is delivered, spooled or dropped; the next process replays what was never
settled. Measured before: about one answered call lost per SIGKILL of the proxy (its
batch buffer and this publisher's queue were memory only).

Delivery is at least once: an event can arrive twice (a resent message the broker
had kept; a message that timed out in a stalled broker and was spooled, then
written when the broker resumed; a process stopped while a message is in flight).
Consumers dedupe by `event_id`. ``llmpulse_events_out_total`` counts deliveries
(successful delivery reports) in events, so a message delivered again after a broker
lost it counts again.

Spool record: header ``<IHiI`` (crc32 of the rest, topic length, key length or -1,
value length) followed by topic, key and value bytes. A torn record at the end (a
crash mid-write) is cut off when the spool is opened.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmpulse.schemas.base import WireModel
from llmpulse.schemas.codec import encode, encode_batch

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<IHiI")
SPOOL_FILE = "spool.bin"
OFFSET_FILE = "spool.offset"
Item = tuple[str, bytes | None, bytes]
# the in-flight log records a queued message settles: (segment, how many), see log_accepted
Logged = tuple[tuple[int, int], ...]
Queued = tuple[str, bytes | None, bytes, Logged]

try:
    from llmpulse.metrics import EVENTS_OUT, PUBLISH_DROPPED, PUBLISH_SPOOL_BYTES

    _METRICS = True
except ImportError:  # pragma: no cover - light install without prometheus-client
    _METRICS = False


def events_in(value: bytes | None) -> int:
    """How many events a message holds: a batch envelope's length, else 1 (never raises).

    Drops and deliveries are counted in events, whether the producer batched them or not."""
    if not value or value.find(b'"events"', 0, 64) < 0:
        return 1
    try:
        got = _count_events(value)
    except ValueError:
        return 1
    return got if got > 0 else 1


try:
    import msgspec

    class _Envelope(msgspec.Struct):
        events: list[msgspec.Raw] | None = None

    _envelope_dec = msgspec.json.Decoder(_Envelope)

    def _count_events(value: bytes) -> int:
        try:
            events = _envelope_dec.decode(value).events
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ValueError(str(exc)) from None
        return len(events) if events is not None else 0

except ImportError:  # pragma: no cover - light install: the standard library's parser

    def _count_events(value: bytes) -> int:
        import json

        events = json.loads(value).get("events")
        return len(events) if isinstance(events, list) else 0


@dataclass
class SpoolStats:
    queued: int = 0
    delivered: int = 0
    spooled: int = 0
    replayed: int = 0
    dropped: int = 0
    failed_deliveries: int = 0
    delivered_events: int = 0  # events in the delivered messages (batch envelopes hold many)
    resent: int = 0  # acknowledged messages spooled again because the broker went down soon after


def _parse_records(data: bytes | bytearray, pos: int, end: int, max_records: int) -> list[tuple[int, Item]]:
    """Up to `max_records` whole records of `data[pos:end]`, each with the offset just past it."""
    out: list[tuple[int, Item]] = []
    view = memoryview(data)
    while pos + _HEADER.size <= end and len(out) < max_records:
        _crc, tl, kl, vl = _HEADER.unpack_from(view, pos)
        start = pos + _HEADER.size
        stop = start + tl + max(kl, 0) + vl
        if stop > end:
            break
        topic = bytes(view[start : start + tl]).decode()
        key = bytes(view[start + tl : start + tl + kl]) if kl >= 0 else None
        value = bytes(view[start + tl + max(kl, 0) : stop])
        pos = stop
        out.append((pos, (topic, key, value)))
    return out


def _record(topic: str, key: bytes | None, value: bytes) -> bytes:
    t = topic.encode()
    k = key or b""
    body = struct.pack("<HiI", len(t), -1 if key is None else len(k), len(value)) + t + k + value
    return struct.pack("<I", zlib.crc32(body)) + body


class SpoolFile:
    """The append-only spool and its replay offset. Not thread-safe: the caller locks."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / SPOOL_FILE
        self.offset_path = directory / OFFSET_FILE
        self.path.touch(exist_ok=True)
        self.size = self._valid_size()
        self.offset = min(self._read_offset(), self.size)
        self._writer = open(self.path, "ab")  # noqa: SIM115 - kept open for appends
        self._reader = open(self.path, "rb")  # noqa: SIM115

    def _read_offset(self) -> int:
        try:
            return int(self.offset_path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _valid_size(self) -> int:
        """Size up to the last whole, intact record; a torn or corrupt tail is cut off."""
        size = self.path.stat().st_size
        pos = 0
        with open(self.path, "rb") as f:
            while pos < size:
                head = f.read(_HEADER.size)
                if len(head) < _HEADER.size:
                    break
                crc, tl, kl, vl = _HEADER.unpack(head)
                rest = f.read(tl + max(kl, 0) + vl)
                if len(rest) < tl + max(kl, 0) + vl or zlib.crc32(head[4:] + rest) != crc:
                    break
                pos += _HEADER.size + len(rest)
        if pos < size:
            log.warning("spool %s: cut %d bytes of a torn or corrupt record", self.path, size - pos)
            with open(self.path, "r+b") as f:
                f.truncate(pos)
        return pos

    @property
    def pending(self) -> int:
        return self.size - self.offset

    def append(self, records: Sequence[bytes]) -> None:
        data = b"".join(records)
        self._writer.write(data)
        self._writer.flush()
        self.size += len(data)

    def read(self, max_records: int) -> list[tuple[int, Item]]:
        """Up to `max_records` unreplayed records, each with the offset just past it."""
        out: list[tuple[int, Item]] = []
        pos = self.offset
        self._reader.seek(pos)
        while pos < self.size and len(out) < max_records:
            head = self._reader.read(_HEADER.size)
            if len(head) < _HEADER.size:
                break
            _crc, tl, kl, vl = _HEADER.unpack(head)
            topic = self._reader.read(tl).decode()
            key = self._reader.read(kl) if kl >= 0 else None
            value = self._reader.read(vl)
            pos += _HEADER.size + tl + max(kl, 0) + vl
            out.append((pos, (topic, key, value)))
        return out

    def commit(self, offset: int) -> None:
        self.offset = offset
        if self.offset >= self.size:  # all replayed: start afresh
            self._writer.truncate(0)
            self._writer.seek(0)
            self.size = self.offset = 0
        tmp = self.offset_path.with_suffix(".tmp")
        tmp.write_text(str(self.offset))
        os.replace(tmp, self.offset_path)

    def close(self) -> None:
        self._writer.close()
        self._reader.close()


def _intact_records(data: bytes) -> list[bytes]:
    """The whole records of `data` whose crc holds, up to the first torn or corrupt one."""
    out: list[bytes] = []
    pos = 0
    while pos + _HEADER.size <= len(data):
        crc, tl, kl, vl = _HEADER.unpack_from(data, pos)
        end = pos + _HEADER.size + tl + max(kl, 0) + vl
        if end > len(data) or zlib.crc32(data[pos + 4 : end]) != crc:
            break
        out.append(data[pos:end])
        pos = end
    return out


class InflightLog:
    """Accepted events and messages not yet settled (delivered, spooled or dropped), on disk.

    librdkafka holds a message in memory until the broker acknowledges it or the delivery
    timeout passes; a process killed meanwhile (SIGKILL, OOM) lost it, measured by the chaos
    benchmark: 14 calls answered by a proxy killed right after a broker stall. The proxy's
    batch buffer held answered calls in memory too (up to `batch_linger_ms`, then the
    publisher's queue): one event lost per SIGKILL of the proxy in the chaos benchmark. So
    each event is appended here when the caller accepts it (``SpoolingPublisher.log_accepted``,
    the caller's thread), and each message the publisher hands to librdkafka that carries
    no logged events (spool replays, unlogged callers) when it is handed over. No fsync:
    the page cache outlives the process. Records go to segments of `SEGMENT_S`; each
    record counts once in its segment until settled, a segment is deleted once all its
    records are settled, and a new process moves the segments it finds into the spool
    (at least once: some may have arrived). Thread-safe (one lock, never held over I/O
    that can wait on the network)."""

    SEGMENT_S = 2.0
    SEGMENT_BYTES = 8 << 20

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._unsettled: dict[int, int] = {}
        self._cur_id = max((int(p.stem) for p in directory.glob("*.bin") if p.stem.isdigit()), default=0) + 1
        self._cur: Any = None
        self._cur_bytes = 0
        self._cur_since = 0.0
        self._lock = threading.Lock()

    def _path(self, seg: int) -> Path:
        return self.dir / f"{seg:012d}.bin"

    def recover(self) -> list[bytes]:
        """The intact records of the segments an earlier process left; the files are removed."""
        out: list[bytes] = []
        for path in sorted(self.dir.glob("*.bin")):
            try:
                out += _intact_records(path.read_bytes())
                path.unlink()
            except OSError as exc:
                log.error("cannot read the in-flight log %s: %s", path, exc)
        return out

    def _segment(self) -> int:
        """The segment the next records go to (a new one every SEGMENT_S or SEGMENT_BYTES)."""
        now = time.monotonic()
        if self._cur is not None and (now - self._cur_since > self.SEGMENT_S or self._cur_bytes > self.SEGMENT_BYTES):
            self._cur.close()
            self._cur = None
            done = self._cur_id
            self._cur_id += 1
            if self._unsettled.get(done, 0) == 0:
                self._remove(done)
        if self._cur is None:
            self._cur = open(self._path(self._cur_id), "ab")  # noqa: SIM115 - kept open for appends
            self._cur_bytes = 0
            self._cur_since = now
        return self._cur_id

    def write(self, records: Sequence[bytes]) -> int:
        """Append `records`, unsettled, to the current segment; returns it (0: nothing written).

        Picking the segment and writing are one step under the lock: another thread may
        rotate segments at any time."""
        if not records:
            return 0
        data = records[0] if len(records) == 1 else b"".join(records)
        with self._lock:
            seg = self._segment()
            self._cur.write(data)
            self._cur.flush()  # in the OS now: a SIGKILL after this line loses nothing
            self._cur_bytes += len(data)
            self._unsettled[seg] = self._unsettled.get(seg, 0) + len(records)
            return seg

    def settle(self, seg: int, n: int = 1) -> None:
        """`n` records of segment `seg` are delivered, spooled or dropped."""
        with self._lock:
            left = self._unsettled.get(seg, 0) - n
            if left > 0:
                self._unsettled[seg] = left
                return
            self._unsettled.pop(seg, None)
            if seg != self._cur_id:
                self._remove(seg)

    def _remove(self, seg: int) -> None:
        self._unsettled.pop(seg, None)
        with contextlib.suppress(OSError):
            self._path(seg).unlink()

    @property
    def unsettled(self) -> int:
        with self._lock:
            return sum(self._unsettled.values())

    def close(self) -> None:
        with self._lock:
            if self._cur is not None:
                self._cur.close()
                self._cur = None
            if not self._unsettled:  # everything settled: nothing to recover
                for path in self.dir.glob("*.bin"):
                    with contextlib.suppress(OSError):
                        path.unlink()


class MemorySpool:
    """The spool's records in memory, for a process that must not write files (the in-app SDK).

    Same interface and bound as SpoolFile; it survives broker outages, not the process."""

    path = "memory"

    def __init__(self) -> None:
        self._buf = bytearray()
        self.offset = 0

    @property
    def size(self) -> int:
        return len(self._buf)

    @property
    def pending(self) -> int:
        return len(self._buf) - self.offset

    def append(self, records: Sequence[bytes]) -> None:
        for rec in records:
            self._buf += rec

    def read(self, max_records: int) -> list[tuple[int, Item]]:
        return _parse_records(self._buf, self.offset, len(self._buf), max_records)

    def commit(self, offset: int) -> None:
        self.offset = offset
        if self.offset >= len(self._buf):
            self._buf.clear()
            self.offset = 0
        elif self.offset >= 1 << 20:  # give replayed bytes back now and then, not per record
            del self._buf[: self.offset]
            self.offset = 0

    def close(self) -> None:
        pass


class AckHold:
    """Acknowledged messages kept for `hold_s` after their ack (at most `max_bytes`).

    A broker that goes down soon after acknowledging may have lost them (see the module
    docstring); ``take_recent()`` gives back those acknowledged within `hold_s`. Not
    thread-safe: one thread (the one serving delivery reports) uses it."""

    def __init__(self, hold_s: float, max_bytes: int = 64 << 20) -> None:
        self.hold_s = hold_s
        self.max_bytes = max_bytes
        self._items: deque[tuple[float, Item]] = deque()
        self._bytes = 0
        self._warned = False

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: Item) -> None:
        if self.hold_s <= 0:
            return
        now = time.monotonic()
        self._items.append((now, item))
        self._bytes += len(item[2])
        self.expire(now)

    def expire(self, now: float) -> None:
        items, horizon = self._items, now - self.hold_s
        while items and (items[0][0] < horizon or self._bytes > self.max_bytes):
            if items[0][0] >= horizon and not self._warned:
                self._warned = True
                log.warning("more than %d bytes acknowledged within %.0f s: the oldest are released early",
                            self.max_bytes, self.hold_s)
            self._bytes -= len(items.popleft()[1][2])

    def take_recent(self) -> list[Item]:
        horizon = time.monotonic() - self.hold_s
        out = [item for acked, item in self._items if acked >= horizon]
        self._items.clear()
        self._bytes = 0
        return out


class SpoolingPublisher:
    """Non-blocking Kafka publisher with a bounded queue and a disk spool for broker outages."""

    def __init__(
        self,
        kafka_settings: dict[str, Any],
        spool_dir: Path | None,
        *,
        spool_max_bytes: int = 1 << 30,
        queue_size: int = 100_000,
        delivery_timeout_s: float = 15.0,
        retry_s: float = 2.0,
        component: str = "proxy",
        batch: int = 256,
        hold_s: float | None = None,
        hold_max_bytes: int = 64 << 20,
    ) -> None:
        from confluent_kafka import KafkaError, Producer

        self._KafkaError = KafkaError
        settings = {
            "message.timeout.ms": int(delivery_timeout_s * 1000),
            "reconnect.backoff.max.ms": 1000,
            "log_level": 3,
            **kafka_settings,
            "error_cb": self._on_error,
        }
        self._producer = Producer(settings)
        self._queue: deque[Queued] = deque()
        self._queue_size = queue_size
        self._spool_max = spool_max_bytes
        self._retry_s = retry_s
        self._batch = batch
        self.component = component
        self.stats = SpoolStats()
        self._lock = threading.Lock()
        self._spool: SpoolFile | MemorySpool = SpoolFile(spool_dir) if spool_dir is not None else MemorySpool()
        self._wal = InflightLog(spool_dir / "inflight") if spool_dir is not None else None
        if self._wal is not None:
            left = self._wal.recover()
            if left:
                log.warning("%d messages were in flight when an earlier process stopped: replaying them "
                            "(at least once)", len(left))
                self._spool.append(left)
        # acknowledged messages kept until the broker has stayed up `hold_s` after their ack
        self._hold = AckHold(delivery_timeout_s if hold_s is None else hold_s, hold_max_bytes)
        self._up = True
        self._next_probe = 0.0
        self._stopping = threading.Event()
        self._close_timeout = 5.0
        self._prober: threading.Thread | None = None
        self._thread = threading.Thread(target=self._run, name=f"llmpulse-publisher-{component}", daemon=True)
        if self._spool.pending:
            log.info("spool %s holds %d bytes from earlier; replaying when Kafka answers", spool_dir, self._spool.pending)
        self._gauge()
        self._thread.start()

    # ---- caller side (any thread, never blocks on the network) ----

    def log_accepted(self, topic: str, value: bytes, key: bytes | str | None = None) -> int:
        """Write one accepted event to the in-flight log now (the caller's thread); its segment.

        For a caller that holds events before publishing them (the proxy's batch buffer):
        from here on a killed process loses nothing, the next one replays the event. The
        caller owes the segment back: ``publish_raw(..., logged=((seg, n), ...))`` with the
        message that carries the event settles it once that message is delivered, spooled
        or dropped. 0 (nothing logged: publish as usual) without a spool directory or
        once closing. Never raises: a log that cannot be written logs a warning and gives 0."""
        if self._wal is None or self._stopping.is_set():
            return 0
        k = key.encode() if isinstance(key, str) else key
        try:
            return self._wal.write((_record(topic, k, value),))
        except (OSError, ValueError) as exc:  # the message still goes out, only unprotected
            log.warning("cannot write the in-flight log %s: %s", self._wal.dir, exc)
            return 0

    def publish_raw(
        self, topic: str, value: bytes, key: bytes | str | None = None, logged: Logged = ()
    ) -> bool:
        """Queue one message; it is spooled when the queue is full. False only when dropped.

        `logged`: the in-flight log records of the events this message carries (from
        ``log_accepted``); this publisher settles them with the message (never twice)."""
        k = key.encode() if isinstance(key, str) else key
        if len(self._queue) < self._queue_size and not self._stopping.is_set():
            self._queue.append((topic, k, value, logged))
            return True
        kept = self._spool_items([(topic, k, value)]) > 0
        self._settle(logged)
        return kept

    def publish(self, topic: str, event: WireModel, key: str | None = None) -> bool:
        return self.publish_raw(topic, encode(event), key)

    def publish_batch(self, topic: str, events: Sequence[WireModel], key: str | None = None) -> bool:
        return self.publish_raw(topic, encode_batch(events), key)

    @property
    def broker_up(self) -> bool:
        return self._up

    @property
    def spool_pending_bytes(self) -> int:
        return self._spool.pending

    def idle(self) -> bool:
        """Nothing queued, in flight, or waiting in the spool."""
        return not self._queue and len(self._producer) == 0 and self._spool.pending == 0

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything is delivered (or `timeout`); True when idle."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.idle():
                return True
            time.sleep(0.02)
        return self.idle()

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what can be delivered within `timeout`; spool the rest."""
        if self._stopping.is_set():
            return
        self._close_timeout = max(0.0, timeout)
        self._stopping.set()
        self._thread.join(timeout + 5)
        with self._lock:
            if isinstance(self._spool, MemorySpool) and self._spool.pending:
                # the process goes, and with it the memory spool: these are lost, so count them
                lost = sum(events_in(value) for _, (_, _, value) in self._spool.read(1 << 62))
                self._spool.commit(self._spool.size)
                log.warning("%d events not delivered before close: dropped", lost)
                self._count_drop(lost)
            self._spool.close()
            if self._wal is not None:
                self._wal.close()

    # ---- background thread ----

    def _gauge(self) -> None:
        if _METRICS:
            PUBLISH_SPOOL_BYTES.labels(self.component).set(self._spool.pending)

    def _on_error(self, err: Any) -> None:
        if self._stopping.is_set():
            return  # librdkafka reports its own teardown as all brokers down; _shutdown spools what is left
        if err.code() == self._KafkaError._ALL_BROKERS_DOWN:
            if self._up:
                log.warning("Kafka unreachable (%s): spooling events", err.str())
            self._mark_down()

    def _mark_down(self) -> None:
        if self._up:
            self._up = False
            self._next_probe = time.monotonic() + self._retry_s
            self._resend_held()

    def _resend_held(self) -> None:
        """Spool again what the broker acknowledged within `hold_s`: it may have gone with the broker."""
        items = self._hold.take_recent()
        if items:
            log.warning(
                "Kafka went down within %.0f s of acknowledging %d messages: spooling them again (at least once)",
                self._hold.hold_s, len(items),
            )
            self.stats.resent += len(items)
            self._spool_items(items)

    def _on_delivery(self, err: Any, msg: Any, logged: Logged = ()) -> None:
        try:
            self._settle_delivery(err, msg)
        finally:  # only now, with the message delivered, spooled or dropped, may its log records go
            self._settle(logged)

    def _settle(self, logged: Logged) -> None:
        if self._wal is not None:
            for seg, n in logged:
                if seg:
                    self._wal.settle(seg, n)

    def _settle_delivery(self, err: Any, msg: Any) -> None:
        if err is None:
            value = msg.value() or b""
            n = events_in(value)
            self.stats.delivered += 1
            self.stats.delivered_events += n
            if _METRICS:
                EVENTS_OUT.labels(self.component, msg.topic()).inc(n)
            self._hold.add((msg.topic(), msg.key(), value))
            return
        self.stats.failed_deliveries += 1
        code = err.code()
        if code == self._KafkaError.MSG_SIZE_TOO_LARGE:
            n = events_in(msg.value())
            log.error("%d events dropped: a message larger than the broker accepts (%d bytes)", n, len(msg.value() or b""))
            self._count_drop(n)
            return
        self._mark_down()
        self._spool_items([(msg.topic(), msg.key(), msg.value() or b"")])

    def _count_drop(self, n: int) -> None:
        self.stats.dropped += n
        if _METRICS:
            PUBLISH_DROPPED.labels(self.component).inc(n)

    def _spool_items(self, items: Sequence[Item]) -> int:
        """Append to the spool within its limit; returns how many were kept."""
        records = []
        left_out: list[bytes] = []
        with self._lock:
            room = self._spool_max - self._spool.pending
            for topic, key, value in items:
                rec = _record(topic, key, value)
                if len(rec) > room:
                    left_out.append(value)
                    continue
                room -= len(rec)
                records.append(rec)
            try:
                self._spool.append(records)
            except (OSError, ValueError) as exc:
                log.error("cannot write the spool %s: %s", self._spool.path, exc)
                records = []
                left_out = [value for _, _, value in items]
            self._gauge()
        kept = len(records)
        self.stats.spooled += kept
        if left_out:
            lost = sum(events_in(value) for value in left_out)
            self._count_drop(lost)
            log.warning("spool full (%d bytes): %d events dropped", self._spool_max, lost)
        return kept

    def _produce(self, topic: str, key: bytes | None, value: bytes, logged: Logged = ()) -> bool:
        try:
            if logged:
                self._producer.produce(topic, value=value, key=key,
                                       on_delivery=lambda err, msg: self._on_delivery(err, msg, logged))  # fmt: skip
            else:
                self._producer.produce(topic, value=value, key=key, on_delivery=self._on_delivery)
            return True
        except BufferError:
            return False
        except Exception as exc:  # monitoring never fails the caller
            log.warning("cannot queue event for %s: %s", topic, exc)
            return False

    def _drain(self) -> int:
        n = 0
        items: list[Queued] = []
        q = self._queue
        while q and n < self._batch:
            items.append(q.popleft())
            n += 1
        if not items:
            return 0
        if self._up:
            # messages whose events are not in the log yet go in now, before librdkafka holds
            # them (delivery reports, which settle them, come only from this thread's poll)
            bare = [_record(t, k, v) for t, k, v, logged in items if not logged] if self._wal is not None else []
            seg = self._wal.write(bare) if self._wal is not None else 0
            rest: list[Item] = []
            settle: list[Logged] = []
            for topic, key, value, logged in items:
                mine = logged or (((seg, 1),) if seg else ())
                if not self._produce(topic, key, value, mine):
                    rest.append((topic, key, value))
                    settle.append(mine)
            if rest:
                self._spool_items(rest)
                for logged in settle:  # spooled (or dropped, counted): the spool holds them now
                    self._settle(logged)
        else:
            self._spool_items([(t, k, v) for t, k, v, _ in items])
            for _, _, _, logged in items:
                self._settle(logged)
        self.stats.queued += n
        return n

    def _probe(self) -> None:
        """Ask for metadata from a thread of its own: while the question waits (a stalled broker
        answers nothing), this thread keeps moving new events from memory into the spool."""
        now = time.monotonic()
        if now < self._next_probe or (self._prober is not None and self._prober.is_alive()):
            return
        self._next_probe = now + self._retry_s
        self._prober = threading.Thread(target=self._ask_broker, name=f"llmpulse-probe-{self.component}", daemon=True)
        self._prober.start()

    def _ask_broker(self) -> None:
        try:
            self._producer.list_topics(timeout=min(self._retry_s, 5.0))
        except Exception:  # still down
            return
        if not self._stopping.is_set():
            log.info("Kafka reachable again; replaying %d spooled bytes", self._spool.pending)
            self._up = True

    def _replay(self) -> None:
        with self._lock:
            if not self._spool.pending:
                return
            records = self._spool.read(self._batch)
            done = self._spool.offset
            # in the log before librdkafka holds them and before they leave the spool
            seg = self._wal.write([_record(*it) for _, it in records]) if self._wal is not None else 0
            sent = 0
            for end, (topic, key, value) in records:
                if not self._produce(topic, key, value, ((seg, 1),) if seg else ()):
                    break
                done = end
                sent += 1
                self.stats.replayed += 1
            if sent < len(records):  # still in the spool (the offset stops before them)
                self._settle(((seg, len(records) - sent),))
            self._spool.commit(done)
            self._gauge()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                busy = self._drain()
                if self._up:
                    self._replay()
                else:
                    self._probe()
                self._producer.poll(0 if busy else 0.02)
                if self._hold:
                    self._hold.expire(time.monotonic())
            except Exception:  # the publisher thread must not die
                log.exception("publisher loop error")
                time.sleep(0.1)
        self._shutdown()

    def _shutdown(self) -> None:
        while self._drain():
            pass
        if self._up:
            self._producer.flush(min(self._close_timeout, 5.0))
        if len(self._producer):
            with contextlib.suppress(Exception):
                self._producer.purge(in_queue=True, in_flight=True)
            self._producer.poll(0)  # failed deliveries -> spool
            self._producer.flush(0)
