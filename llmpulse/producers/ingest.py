"""HTTP ingest: `POST /ingest/calls` and `POST /ingest/feedback` for apps in any language,
and OTLP/HTTP `POST /v1/traces` (GenAI spans become CallEvents: producers/otlp_genai.py,
wire format: producers/otlp_wire.py; OTLP responses, not the JSON below).

Body: one event (a JSON object), a batch (a JSON list, or ``{"events": [...]}``), or
NDJSON (``Content-Type: application/x-ndjson``: one event per line, so that one bad
line does not spoil the others). Each item is validated with the wire schemas
(CallEvent with ``source`` forced to ``ingest``; Feedback).

Responses (JSON, always with per-item ``results`` in request order)::

    202  every item accepted          {"accepted": n, "rejected": 0, "results": [...]}
    207  some accepted, some not      {"accepted": a, "rejected": r, "results": [...]}
    400  nothing accepted             {"error": "<first reason>", "accepted": 0, ...}
    401  bearer token missing/wrong (only when LLMPULSE_SECRET_INGEST_TOKEN is set)
    413  body larger than ingest.max_body_bytes
    503  Kafka did not acknowledge within ingest.delivery_timeout_s (retry; send your
         own event_id so that a retry never counts twice; an event with an id but no
         ts keeps the ts of its first arrival for 15 min: producers/retry_stamps.py)

A result is ``{"index": i, "status": "accepted", "event_id": ...}`` or
``{"index": i, "status": "rejected", "error": "field 'latency_ms': ..."}``. Accepted
means acknowledged by Kafka. Every rejected item's raw bytes go to the dead-letter
topic with the reason. A body nested deeper than 64 levels is rejected with that reason
(400), never parsed into a RecursionError. `GET /healthz`, `GET /metrics` (Prometheus).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llmpulse.config import Settings
from llmpulse.metrics import DEAD_LETTERS, EVENTS_IN, EVENTS_OUT, OTLP_SPANS
from llmpulse.producers import otlp_wire
from llmpulse.producers.otlp_genai import Skipped, attributes, call_from_span
from llmpulse.producers.pricing import PriceTable
from llmpulse.producers.retry_stamps import RetryStamps
from llmpulse.schemas import CallEvent, DeadLetter, Feedback, encode, encode_batch
from llmpulse.schemas.base import WireModel
from llmpulse.schemas.codec import validate_item
from llmpulse.schemas.nesting import InputTooComplex, loads_json

log = logging.getLogger(__name__)

TOKEN_ENV = "LLMPULSE_SECRET_INGEST_TOKEN"
NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/json-lines", "application/ndjson")
_SETTINGS = web.AppKey("settings", Settings)
_TOKEN = web.AppKey("token", str)
_PRICES = web.AppKey("prices", PriceTable)


class BrokerUnavailable(Exception):
    pass


class KafkaSender:
    """A confluent-kafka producer whose sends can be awaited until the broker acknowledges them.

    An acknowledgement answers 202, yet a broker that goes down just after may have lost the
    message (the embedded one acknowledges for ~5 s after SIGTERM, then exits with them). With
    `spool_dir`, messages acknowledged within `hold_s` before all brokers went down are handed
    to a SpoolingPublisher (disk spool, replayed when a broker answers): at least once."""

    def __init__(self, conf: dict[str, Any], spool_dir: Path | None = None, hold_s: float = 0.0) -> None:
        from confluent_kafka import KafkaError, Producer

        from llmpulse.producers.spool import AckHold, SpoolingPublisher

        self._hold = AckHold(hold_s if spool_dir is not None else 0.0)
        self._resend: SpoolingPublisher | None = None
        if spool_dir is not None:
            self._resend = SpoolingPublisher(conf, spool_dir, delivery_timeout_s=max(hold_s, 1.0), component="ingest")
        self._all_down = KafkaError._ALL_BROKERS_DOWN
        self._p = Producer({**conf, "error_cb": self._on_error})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="llmpulse-ingest-poll", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._p.poll(0.05)
            if len(self._hold):
                self._hold.expire(time.monotonic())

    def _on_error(self, err: Any) -> None:
        if err.code() != self._all_down or self._resend is None or self._stop.is_set():
            return
        items = self._hold.take_recent()
        if items:
            log.warning("Kafka went down within %.0f s of acknowledging %d messages: spooling them again",
                        self._hold.hold_s, len(items))
        for topic, key, value in items:
            self._resend.publish_raw(topic, value, key)

    async def send(self, topic: str, value: bytes, key: str | None, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def done(f: asyncio.Future[None], err: Any) -> None:
            if f.done():
                return
            if err is None:
                f.set_result(None)
            else:
                f.set_exception(BrokerUnavailable(str(err)))

        def on_delivery(err: Any, msg: Any) -> None:
            if err is None:
                self._hold.add((msg.topic(), msg.key(), msg.value() or b""))
            loop.call_soon_threadsafe(done, fut, err)

        try:
            self._p.produce(topic, value=value, key=key, on_delivery=on_delivery)
        except BufferError:
            raise BrokerUnavailable("the producer queue is full") from None
        except Exception as exc:
            raise BrokerUnavailable(str(exc)) from None
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise BrokerUnavailable(f"no acknowledgement from Kafka within {timeout:g} s") from None

    def close(self, timeout: float = 5.0) -> None:
        self._p.flush(timeout)
        self._stop.set()
        self._thread.join(1.0)
        if self._resend is not None:
            self._resend.close(timeout)


_PRODUCER = web.AppKey("producer", KafkaSender)
_STAMPS = web.AppKey("retry_stamps", RetryStamps)


@dataclass(slots=True)
class _Item:
    raw: bytes
    value: Any  # parsed JSON, or None when it is not JSON
    error: str | None = None


def _items_of(body: bytes, content_type: str, max_items: int) -> list[_Item] | str:
    """The request's items, or the reason the whole body is unusable."""
    if content_type in NDJSON_TYPES:
        out = []
        for line in body.splitlines():
            if not line.strip():
                continue
            try:
                out.append(_Item(line, loads_json(line)))
            except InputTooComplex as exc:
                out.append(_Item(line, None, f"JSON {exc}"))
            except ValueError as exc:
                out.append(_Item(line, None, f"invalid JSON: {exc}"))
        if not out:
            return "empty body: expected one JSON event per line"
        return out if len(out) <= max_items else f"more than {max_items} events in one request"
    try:
        doc = loads_json(body)
    except InputTooComplex as exc:
        return f"JSON {exc}"
    except ValueError as exc:
        return f"invalid JSON: {exc}"
    if isinstance(doc, dict) and "events" in doc and "event_id" not in doc:
        extra = set(doc) - {"events", "schema_version"}
        if extra:
            return f"field '{sorted(extra)[0]}': unknown field of a batch (expected 'events')"
        doc = doc["events"]
        if not isinstance(doc, list):
            return "field 'events': a batch needs a JSON list of events"
    if isinstance(doc, list):
        if not doc:
            return "empty batch: no events"
        if len(doc) > max_items:
            return f"more than {max_items} events in one request"
        return [_Item(json.dumps(v, separators=(",", ":")).encode(), v) for v in doc]
    return [_Item(body, doc)]


def _check_token(request: web.Request) -> web.Response | None:
    token = request.app[_TOKEN]
    if not token:
        return None
    got = request.headers.get("Authorization", "")
    scheme, _, value = got.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode()):
        return None
    return web.json_response(
        {"error": "a valid bearer token is required (Authorization: Bearer <token>)"},
        status=401,
        headers={"WWW-Authenticate": 'Bearer realm="llmpulse-ingest"'},
    )


async def _dead_letter(app: web.Application, endpoint: str, items: list[tuple[bytes, str]]) -> None:
    settings = app[_SETTINGS]
    topic = settings.kafka.topic("deadletter")
    letters = [DeadLetter.for_bytes(raw, reason[:4096], source=f"ingest {endpoint}") for raw, reason in items]
    await asyncio.gather(
        *(app[_PRODUCER].send(topic, encode(d), None, settings.ingest.delivery_timeout_s) for d in letters)
    )
    DEAD_LETTERS.labels("ingest", "invalid").inc(len(letters))
    EVENTS_OUT.labels("ingest", topic).inc(len(letters))


def _prepare(value: dict[str, Any], kind: str, stamps: RetryStamps) -> dict[str, Any]:
    """Source forced to ingest; an event with its own id but no ts gets the ts of its first
    arrival, so a retry is the same event (producers/retry_stamps.py)."""
    out = {**value, "source": "ingest"} if kind == "calls" else dict(value)
    event_id = out.get("event_id")
    if out.get("ts") is None and isinstance(event_id, str) and event_id:
        out["ts"] = stamps.stamp(event_id).isoformat()
    return out


async def _handle(request: web.Request, endpoint: str, kind: str) -> web.Response:
    denied = _check_token(request)
    if denied is not None:
        return denied
    app = request.app
    settings = app[_SETTINGS]
    cfg = settings.ingest
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return web.json_response(
            {"error": f"request body larger than {cfg.max_body_bytes} bytes; send smaller batches"},
            status=413,
        )
    ctype = request.content_type.lower()
    items = _items_of(body, ctype, cfg.max_items)
    try:
        if isinstance(items, str):
            await _dead_letter(app, endpoint, [(body, items)])
            return web.json_response(
                {"error": items, "accepted": 0, "rejected": 1, "results": [{"index": 0, "status": "rejected", "error": items}]},
                status=400,
            )
        model: type[CallEvent] | type[Feedback] = CallEvent if kind == "calls" else Feedback
        results: list[dict[str, Any]] = []
        valid: list[WireModel] = []
        bad: list[tuple[bytes, str]] = []
        for i, item in enumerate(items):
            if item.error is None and isinstance(item.value, dict):
                item.value = _prepare(item.value, kind, app[_STAMPS])
            outcome = item.error or validate_item(model, item.value)
            if isinstance(outcome, str):
                results.append({"index": i, "status": "rejected", "error": outcome})
                bad.append((item.raw, outcome))
            else:
                results.append({"index": i, "status": "accepted", "event_id": outcome.event_id})  # type: ignore[attr-defined]
                valid.append(outcome)
        EVENTS_IN.labels("ingest", endpoint).inc(len(items))
        await asyncio.gather(_publish(app, kind, valid), _dead_letter(app, endpoint, bad) if bad else asyncio.sleep(0))
    except BrokerUnavailable as exc:
        log.warning("ingest: Kafka unavailable: %s", exc)
        return web.json_response(
            {"error": f"events not stored: Kafka unavailable ({exc}); retry later"}, status=503
        )
    accepted, rejected = len(valid), len(bad)
    payload: dict[str, Any] = {"accepted": accepted, "rejected": rejected, "results": results}
    if accepted == 0:
        payload = {"error": bad[0][1], **payload}
        status = 400
    else:
        status = 207 if rejected else 202
    return web.json_response(payload, status=status)


def _by_key(kind: str, events: list[WireModel]) -> Iterator[tuple[str, list[WireModel]]]:
    groups: dict[str, list[WireModel]] = defaultdict(list)
    for e in events:
        key = e.model if isinstance(e, CallEvent) else e.call_event_id if isinstance(e, Feedback) else ""
        groups[key].append(e)
    yield from groups.items()


async def _publish(app: web.Application, kind: str, events: list[WireModel]) -> None:
    """Calls keyed by model (one batch message per model), feedback keyed by the call judged."""
    if not events:
        return
    settings = app[_SETTINGS]
    topic = settings.kafka.topic("calls" if kind == "calls" else "feedback")
    sends = []
    for key, group in _by_key(kind, events):
        value = encode(group[0]) if len(group) == 1 else encode_batch(group)
        sends.append(app[_PRODUCER].send(topic, value, key, settings.ingest.delivery_timeout_s))
    await asyncio.gather(*sends)
    EVENTS_OUT.labels("ingest", topic).inc(len(events))


async def _calls(request: web.Request) -> web.Response:
    return await _handle(request, "/ingest/calls", "calls")


async def _feedback(request: web.Request) -> web.Response:
    return await _handle(request, "/ingest/feedback", "feedback")


async def _traces(request: web.Request) -> web.Response:
    """OTLP/HTTP trace export: GenAI spans become CallEvents; see producers/otlp_genai.py."""
    endpoint = "/v1/traces"
    ctype = request.content_type.lower()
    enc = ctype if ctype in otlp_wire.CONTENT_TYPES else otlp_wire.JSON

    def fail(status: int, code: int, message: str) -> web.Response:
        return web.Response(body=otlp_wire.failure(enc, code, message), status=status, content_type=enc)

    denied = _check_token(request)
    if denied is not None:
        return denied
    app = request.app
    cfg = app[_SETTINGS].ingest
    if ctype not in otlp_wire.CONTENT_TYPES:
        return fail(415, otlp_wire.INVALID_ARGUMENT, f"unsupported Content-Type {ctype!r}: send application/x-protobuf or application/json")
    try:
        body = await request.read()  # gzip is decompressed by aiohttp; the limit applies to the result
    except web.HTTPRequestEntityTooLarge:
        return fail(413, otlp_wire.INVALID_ARGUMENT, f"request body larger than {cfg.max_body_bytes} bytes; export smaller batches")
    try:
        try:
            req = otlp_wire.decode_request(body, ctype)
            spans = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
            if spans > cfg.max_items:
                raise otlp_wire.BadPayload(f"more than {cfg.max_items} spans in one request; export smaller batches")
        except otlp_wire.BadPayload as exc:
            await _dead_letter(app, endpoint, [(body, str(exc))])
            return fail(400, otlp_wire.INVALID_ARGUMENT, str(exc))
        valid: list[WireModel] = []
        bad: list[tuple[bytes, str]] = []
        skipped: dict[str, int] = defaultdict(int)
        prices = app[_PRICES]
        for rs in req.resource_spans:
            resource = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    out = call_from_span(span, resource, prices)
                    if isinstance(out, Skipped):
                        skipped[out.kind] += 1
                    elif isinstance(out, str):
                        bad.append((otlp_wire.span_as_request_json(rs, ss, span), f"span {span.name[:80]!r}: {out}"))
                    else:
                        valid.append(out)
        EVENTS_IN.labels("ingest", endpoint).inc(spans)
        await asyncio.gather(_publish(app, "calls", valid), _dead_letter(app, endpoint, bad) if bad else asyncio.sleep(0))
    except BrokerUnavailable as exc:
        log.warning("ingest: Kafka unavailable: %s", exc)
        return fail(503, otlp_wire.UNAVAILABLE, f"spans not stored: Kafka unavailable ({exc}); retry later")
    OTLP_SPANS.labels("accepted").inc(len(valid))
    OTLP_SPANS.labels("rejected").inc(len(bad))
    for kind, n in skipped.items():
        OTLP_SPANS.labels(kind).inc(n)
    message = f"{len(bad)} of {spans} spans rejected; first: {bad[0][1]}" if bad else ""
    return web.Response(body=otlp_wire.success(enc, len(bad), message), status=200, content_type=enc)


async def _healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _metrics(_request: web.Request) -> web.Response:
    resp = web.Response(body=generate_latest())
    resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return resp


def make_app(settings: Settings, sender: KafkaSender, token: str | None = None) -> web.Application:
    """The aiohttp application. `token` (default: env LLMPULSE_SECRET_INGEST_TOKEN) enables auth."""
    app = web.Application(client_max_size=settings.ingest.max_body_bytes)
    app[_SETTINGS] = settings
    app[_PRODUCER] = sender
    app[_TOKEN] = os.environ.get(TOKEN_ENV, "") if token is None else token
    app[_PRICES] = PriceTable.from_config(settings.pricing)
    app[_STAMPS] = RetryStamps()
    app.router.add_post("/ingest/calls", _calls)
    app.router.add_post("/ingest/feedback", _feedback)
    app.router.add_post("/v1/traces", _traces)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    return app


class IngestServer:
    """The ingest endpoint, started and stopped inside a running asyncio loop."""

    def __init__(
        self,
        settings: Settings,
        bootstrap: str | None = None,
        host: str | None = None,
        port: int | None = None,
        token: str | None = None,
    ) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.host = host or settings.ingest.host
        self.port = settings.ingest.port if port is None else port
        self.token = token
        self._runner: web.AppRunner | None = None
        self._sender: KafkaSender | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> str:
        from llmpulse.kafka.bootstrap import resolve_bootstrap
        from llmpulse.kafka.clients import producer_settings

        bootstrap = self.bootstrap or resolve_bootstrap(self.settings)
        timeout_ms = int(self.settings.ingest.delivery_timeout_s * 1000)
        self._sender = KafkaSender(
            producer_settings(bootstrap, self.settings.kafka, **{"linger.ms": 2, "message.timeout.ms": timeout_ms}),
            Path(self.settings.data_dir) / "spool" / "ingest",
            hold_s=max(self.settings.ingest.delivery_timeout_s, 10.0),  # the embedded broker answers ~5 s after SIGTERM
        )
        self._runner = web.AppRunner(make_app(self.settings, self._sender, self.token), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = getattr(site, "_server", None)
        if self.port == 0 and server is not None and server.sockets:
            self.port = int(server.sockets[0].getsockname()[1])
        log.info("ingest listening on %s", self.url)
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._sender is not None:
            await asyncio.to_thread(self._sender.close)
            self._sender = None


class IngestThread:
    """The ingest endpoint on its own event loop in a daemon thread (for `up` and tests)."""

    def __init__(self, server: IngestServer) -> None:
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="llmpulse-ingest", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.server.start())
        except BaseException as exc:
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.server.stop())
        self._loop.close()

    def start(self, timeout: float = 30.0) -> str:
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError("the ingest server did not start in time")
        if self._error is not None:
            raise self._error
        return self.server.url

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)


def start_ingest_thread(
    settings: Settings, bootstrap: str | None = None, port: int | None = None, token: str | None = None
) -> IngestThread:
    """Start the ingest endpoint in-process; returns the running handle (`.url`, `.stop()`)."""
    t = IngestThread(IngestServer(settings, bootstrap=bootstrap, port=port, token=token))
    t.start()
    return t
