"""The proxy's aiohttp server: `/v1/*` to the upstreams, `/metrics`, `/healthz`.

Both OpenAI-compatible APIs and Anthropic's Messages API (``POST /v1/messages``,
plain or streamed; recorded as operation ``chat``) pass through; any other path
under ``/v1/`` is forwarded and recorded as operation ``other``.

In-process use (what `llmpulse up --demo` does)::

    server = await start_proxy(settings)              # publisher built from settings
    server = await start_proxy(settings, publisher=p) # any object with publish_raw()
    server.base_url   # "http://127.0.0.1:8787/v1": give it to the OpenAI client
    await server.stop()

Per request the proxy reads the body once, decodes only the few fields it needs
(model, stream, stream_options, user), forwards the raw bytes unchanged (except
for the usage request it adds to OpenAI streams), and records the call after the
response is out (see `events.py`). Every response carries ``x-llmpulse-overhead-ms``:
the time spent in the proxy, not waiting on the upstream.

Request bodies are decoded with a nesting limit (`jsonlimits.py`). On the model API
routes (chat, completions, embeddings, responses, messages) the proxy itself needs
the body, to route by model and to know whether to stream: a body it cannot read
(not JSON, nested deeper than `jsonlimits.MAX_DEPTH`) is refused with 400 and the
reason, before any upstream sees it (an upstream would refuse it too). On every other
path the body is the upstream's business: the proxy forwards it unread, and records
the call under operation ``other``. Oversized bodies get 413. No body gets a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llmpulse.config import Settings
from llmpulse.metrics import PROXY_OVERHEAD_SECONDS
from llmpulse.producers.keyhash import KeyHasher, api_key_from_headers, load_secret
from llmpulse.producers.pricing import PriceTable
from llmpulse.producers.proxy import errors
from llmpulse.producers.proxy.enforce import ProxyActions, Refusal
from llmpulse.producers.proxy.events import CallRecord, CallRecorder, RawPublisher
from llmpulse.producers.proxy.forwarding import CircuitOpenError, send
from llmpulse.producers.proxy.jsonlimits import DECODE_ERRORS, JsonLimitError, decode_bounded
from llmpulse.producers.proxy.streaming import SseTap
from llmpulse.producers.proxy.tokens import anthropic_usage, usage_from
from llmpulse.producers.proxy.upstreams import Router, Upstream, is_anthropic, operation_of

log = logging.getLogger(__name__)

OVERHEAD_HEADER = "x-llmpulse-overhead-ms"
_DROP_REQUEST = frozenset(
    {
        "host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "trailer",
        "upgrade", "proxy-authorization", "proxy-connection", "accept-encoding", "expect",
    }
)
_DROP_RESPONSE = frozenset(
    {"content-length", "content-encoding", "transfer-encoding", "connection", "keep-alive", "server", "date"}
)
_STREAM_OPS = frozenset({"chat", "completion"})
_enc = msgspec.json.Encoder()


class _RequestHead(msgspec.Struct):
    model: Any = None
    stream: Any = False
    stream_options: Any = None
    user: Any = None


class _ResponseHead(msgspec.Struct):
    model: Any = None
    usage: Any = None


_req_dec = msgspec.json.Decoder(_RequestHead)
_resp_dec = msgspec.json.Decoder(_ResponseHead)


R = TypeVar("R", bound=web.StreamResponse)


def _now() -> datetime:
    return datetime.now(UTC)


class ProxyServer:
    """The monitoring proxy. `start()` binds host:port; `stop()` drains and closes."""

    def __init__(
        self,
        settings: Settings,
        publisher: RawPublisher | None = None,
        host: str | None = None,
        port: int | None = None,
    ) -> None:
        self.settings = settings
        self.cfg = settings.proxy
        self.host = host if host is not None else self.cfg.host
        self.port = port if port is not None else self.cfg.port
        self._own_publisher = publisher is None
        self.publisher: RawPublisher | None = publisher
        self.router = Router(self.cfg)
        self.prices = PriceTable.from_config(settings.pricing)
        self.hasher = KeyHasher(load_secret(settings.data_dir))
        self.recorder: CallRecorder | None = None
        self._runner: web.AppRunner | None = None
        self.actions = ProxyActions()

    # ---- lifecycle ----

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What to give an OpenAI client as base_url."""
        return f"{self.url}/v1"

    def _make_publisher(self) -> RawPublisher:
        from llmpulse.kafka.bootstrap import resolve_bootstrap
        from llmpulse.kafka.clients import producer_settings
        from llmpulse.producers.spool import SpoolingPublisher

        bootstrap = resolve_bootstrap(self.settings)
        return SpoolingPublisher(
            producer_settings(bootstrap, self.settings.kafka),
            Path(self.settings.data_dir) / "spool" / "proxy",
            spool_max_bytes=self.cfg.spool_max_bytes,
            queue_size=self.cfg.queue_size,
            delivery_timeout_s=self.cfg.delivery_timeout_s,
            retry_s=self.cfg.broker_retry_s,
            component="proxy",
        )

    async def start(self) -> ProxyServer:
        if self.publisher is None:
            self.publisher = self._make_publisher()
        self.recorder = CallRecorder(self.settings, self.publisher, self.prices)
        await self.router.open()
        if self.settings.actions.enforce_in_proxy:
            self._follow_actions()
        app = web.Application(client_max_size=self.cfg.max_body_bytes)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=2048, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            from llmpulse.errors import LLMPulseError

            raise LLMPulseError(f"the proxy cannot listen on {self.host}:{self.port}: {exc}") from None
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])
        log.info("llmpulse proxy on %s -> %s", self.url, ", ".join(f"{u.name}={u.base_url}" for u in self.router.upstreams))
        return self

    def _follow_actions(self) -> None:
        """Enforce the active actions of the `actions` topic (skipped when no broker is known)."""
        from llmpulse.kafka.bootstrap import resolve_bootstrap

        try:
            bootstrap = resolve_bootstrap(self.settings)
        except Exception as exc:
            log.warning("the proxy enforces no actions: %s", exc)
            return
        self.actions.follow(self.settings, bootstrap)

    async def stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.actions.stop)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.router.close()
        if self.recorder is not None:
            self.recorder.close()  # publishes the partly filled batches
        if self._own_publisher and self.publisher is not None:
            close = getattr(self.publisher, "close", None)
            if close is not None:
                await asyncio.get_running_loop().run_in_executor(None, close)
            self.publisher = None

    # ---- small endpoints ----

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        pub = self.publisher
        body = {
            "status": "ok",
            "kafka_up": bool(getattr(pub, "broker_up", True)),
            "spool_bytes": int(getattr(pub, "spool_pending_bytes", 0)),
            "upstreams": {u.name: u.circuit.state for u in self.router.upstreams},
            "actions": {
                "rate_limits": sum(len(v) for v in self.actions.snapshot.limits.values()),
                "blocks": sum(len(v) for v in self.actions.snapshot.blocks.values()),
                "fallbacks": len(self.actions.snapshot.routes),
                "open_circuits": len(self.actions.snapshot.cuts),
            },
        }
        return web.Response(body=_enc.encode(body), content_type="application/json")

    # ---- the proxy ----

    def _error(self, status: int, message: str, etype: str, rec: CallRecord | None, t0: float) -> web.Response:
        if rec is not None:
            rec.status_code = status
            rec.error_type = etype
        if rec is not None and rec.anthropic:
            body = errors.anthropic_error_body(status, message)
        else:
            body = errors.error_body(message, etype)
        return self._finish(web.Response(status=status, body=body, content_type="application/json"), rec, t0, 0.0)

    def _refuse(self, r: Refusal, rec: CallRecord, t0: float) -> web.Response:
        rec.status_code = r.status
        rec.error_type = r.error_type
        if rec.anthropic:
            body = errors.anthropic_error_body(r.status, r.message)
        else:
            body = errors.error_body(r.message, r.error_type, r.code)
        resp = web.Response(status=r.status, body=body, content_type="application/json")
        for k, v in r.headers.items():
            resp.headers[k] = v
        return self._finish(resp, rec, t0, 0.0)

    def _finish(self, resp: R, rec: CallRecord | None, t0: float, upstream_s: float) -> R:
        overhead = time.perf_counter() - t0 - upstream_s
        resp.headers[OVERHEAD_HEADER] = f"{overhead * 1000:.3f}"
        PROXY_OVERHEAD_SECONDS.observe(overhead)
        if rec is not None and not rec.streamed:
            rec.latency_ms = (time.perf_counter() - t0) * 1000
            assert self.recorder is not None
            self.recorder.record(rec)
        return resp

    async def handle(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        split = self.router.split_path(request.path)
        if split is None:
            return self._finish(
                web.Response(status=404, body=errors.error_body(f"no route for {request.path}; the API is under /v1/", "not_found"), content_type="application/json"),
                None, t0, 0.0,
            )
        up, rest = split
        operation = operation_of(rest)
        anthropic = is_anthropic(rest)
        h = request.headers
        key = api_key_from_headers(h)
        rec = CallRecord(
            ts=_now(),
            model="unknown",
            operation=operation,
            provider=up.provider_for(anthropic) if up is not None else "anthropic" if anthropic else "unknown",
            app=h.get("X-LLMPulse-App") or self.cfg.default_app,
            user=h.get("X-LLMPulse-User"),
            api_key_hash=self.hasher.hash(key) if key else None,
            anthropic=anthropic,
        )
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._error(413, f"request body larger than {self.cfg.max_body_bytes} bytes", errors.INVALID_REQUEST, rec, t0)
        except (ConnectionError, asyncio.CancelledError):
            rec.status_code, rec.error_type = errors.CLIENT_CLOSED, errors.CLIENT_DISCONNECTED
            self._finish(web.Response(), rec, t0, 0.0)
            raise
        head = _RequestHead()
        if body and request.method == "POST":
            try:
                head = decode_bounded(body, _req_dec)
            except JsonLimitError as exc:
                if operation != "other":  # the proxy must read it (model, stream): refused
                    return self._error(400, f"the request body is {exc}", errors.INVALID_REQUEST, rec, t0)
            except msgspec.DecodeError:
                if operation != "other":
                    return self._error(400, "the request body is not a JSON object", errors.INVALID_REQUEST, rec, t0)
        if isinstance(head.model, str) and head.model:
            rec.model = head.model
        if rec.user is None and self.cfg.trust_body_user and isinstance(head.user, str) and head.user:
            rec.user = head.user
        acts = self.actions.snapshot
        served: str | None = None
        if acts.any:
            refusal, charge = acts.refusal((rec.api_key_hash, rec.user, rec.app))
            if refusal is not None:
                return self._refuse(refusal, rec, t0)
            if charge:
                rec.charge = charge
            gate = acts.route(rec.model) if acts.routes else None
            if gate is not None:
                if gate.upstream is not None:
                    up = self.router.by_name.get(gate.upstream, up)
                if gate.model is not None and gate.model != rec.model:
                    try:
                        full = decode_bounded(body)
                        full["model"] = gate.model
                        body = _enc.encode(full)
                        served = gate.model
                    except (*DECODE_ERRORS, TypeError):
                        pass
        if up is None:
            up = self.router.by_model(served or (rec.model if isinstance(head.model, str) else None))
            if up is None:
                return self._error(404, f"no upstream configured for model {rec.model!r}", errors.INVALID_REQUEST, rec, t0)
        rec.provider = up.provider_for(anthropic)
        if served is not None:
            rec.response_model = served
        if acts.cuts:
            cut = acts.cut(up.name, rec.provider)  # the provider the calls are recorded under
            if cut is not None:
                return self._error(
                    503, f"upstream {up.name} is cut off by llmpulse action {cut.action_id}; circuit open",
                    errors.ACTION_CIRCUIT_OPEN, rec, t0,
                )
        rec.request_raw = body if operation != "other" else None
        stream = head.stream is True and operation != "embedding"
        hide_usage = False
        # Anthropic streams always carry their usage (message_start, message_delta)
        if stream and operation in _STREAM_OPS and self.cfg.inject_stream_usage and not anthropic:
            so = head.stream_options
            if not (isinstance(so, dict) and so.get("include_usage") is True):
                try:
                    full = decode_bounded(body)
                    so = full.get("stream_options")
                    full["stream_options"] = {**(so if isinstance(so, dict) else {}), "include_usage": True}
                    body = _enc.encode(full)
                    hide_usage = True
                except (*DECODE_ERRORS, AttributeError):
                    pass
        headers = {k: v for k, v in h.items() if k.lower() not in _DROP_REQUEST and not k.lower().startswith("x-llmpulse-")}
        url = up.base_url + rest
        if request.query_string:
            url += "?" + request.query_string
        if stream:
            rec.streamed = True
            return await self._stream(request, up, url, headers, body, rec, t0, hide_usage)
        return await self._forward(request, up, url, headers, body, rec, t0)

    async def _forward(
        self, request: web.Request, up: Upstream, url: str, headers: dict[str, str], body: bytes, rec: CallRecord, t0: float
    ) -> web.StreamResponse:
        try:
            resp, raw, upstream_s, _attempts = await send(up, request.method, url, headers, body, up.cfg.retries)
        except CircuitOpenError:
            return self._error(503, f"upstream {up.name} is failing; circuit open", errors.CIRCUIT_OPEN, rec, t0)
        except asyncio.CancelledError:
            rec.status_code, rec.error_type = errors.CLIENT_CLOSED, errors.CLIENT_DISCONNECTED
            self._finish(web.Response(), rec, t0, 0.0)
            raise
        except Exception as exc:
            status, etype = errors.classify_exception(exc)
            return self._error(status, f"upstream {up.name}: {etype}: {exc.__class__.__name__}", etype, rec, t0)
        return self._respond(request, resp, raw, rec, t0, upstream_s)

    def _respond(
        self, request: web.Request, resp: aiohttp.ClientResponse, raw: bytes, rec: CallRecord, t0: float, upstream_s: float
    ) -> web.StreamResponse:
        status = resp.status
        rec.status_code = status
        rec.error_type = errors.error_type_of_status(status)
        if status >= 400 and rec.anthropic:
            rec.error_type = errors.anthropic_error_type(raw) or rec.error_type
        if status < 400 and raw[:1] == b"{":
            try:
                rh = decode_bounded(raw, _resp_dec)
                if rec.anthropic and isinstance(rh.usage, dict):
                    rec.usage = anthropic_usage(rh.usage)
                else:
                    rec.usage = usage_from(rh.usage)
                if isinstance(rh.model, str):
                    rec.response_model = rh.model
            except DECODE_ERRORS:
                pass
            if rec.usage is None or self.settings.capture.enabled:
                rec.response_raw = raw
        out = web.Response(status=status, reason=resp.reason, body=raw)
        oh = out.headers
        for k, v in resp.headers.items():
            if k.lower() not in _DROP_RESPONSE:
                oh.add(k, v)
        transport = request.transport
        if transport is None or transport.is_closing():
            rec.status_code, rec.error_type = errors.CLIENT_CLOSED, errors.CLIENT_DISCONNECTED
        rec.streamed = False
        return self._finish(out, rec, t0, upstream_s)

    async def _stream(
        self,
        request: web.Request,
        up: Upstream,
        url: str,
        headers: dict[str, str],
        body: bytes,
        rec: CallRecord,
        t0: float,
        hide_usage: bool,
    ) -> web.StreamResponse:
        assert up.session is not None
        rec.streamed = False  # recorded by _finish until the stream starts
        if not up.circuit.allow():
            return self._error(503, f"upstream {up.name} is failing; circuit open", errors.CIRCUIT_OPEN, rec, t0)
        t_up = time.perf_counter()
        try:
            resp = await up.session.request(request.method, url, headers=headers, data=body, timeout=up.stream_timeout)
        except asyncio.CancelledError:
            up.circuit.release()
            raise
        except Exception as exc:
            up.circuit.failure()
            status, etype = errors.classify_exception(exc)
            return self._error(status, f"upstream {up.name}: {etype}: {exc.__class__.__name__}", etype, rec, t0)
        upstream_s = time.perf_counter() - t_up
        if resp.status in errors.RETRY_STATUSES:
            up.circuit.failure()
        else:
            up.circuit.success()
        ctype = resp.headers.get("Content-Type", "")
        if resp.status != 200 or not ctype.startswith("text/event-stream"):
            try:
                raw = await resp.read()
            except Exception as exc:
                status, etype = errors.classify_exception(exc)
                return self._error(status, f"upstream {up.name}: {etype}", etype, rec, t0)
            finally:
                resp.release()
            return self._respond(request, resp, raw, rec, t0, time.perf_counter() - t_up)
        rec.streamed = True
        out = web.StreamResponse(status=200, reason=resp.reason)
        for k, v in resp.headers.items():
            if k.lower() not in _DROP_RESPONSE:
                out.headers.add(k, v)
        self._finish(out, None, t0, upstream_s)
        tap = SseTap(hide_usage)
        rec.stream = tap
        try:
            try:
                await out.prepare(request)
                async for data in resp.content.iter_any():
                    chunk = tap.feed(data)
                    if chunk:
                        await out.write(chunk)
                tail = tap.rest()
                if tail:
                    await out.write(tail)
                await out.write_eof()
            except (ConnectionError, asyncio.CancelledError) as exc:
                if isinstance(exc, aiohttp.ClientConnectionError) and not isinstance(exc, ConnectionResetError):
                    raise
                rec.status_code, rec.error_type = errors.CLIENT_CLOSED, errors.CLIENT_DISCONNECTED
                resp.close()  # drop the upstream connection: the upstream stops generating
                if isinstance(exc, asyncio.CancelledError):
                    raise
            except (TimeoutError, aiohttp.ClientError) as exc:
                status, etype = errors.classify_exception(exc)
                if etype == errors.CONNECTION_ERROR:
                    etype = errors.UPSTREAM_DISCONNECTED
                rec.status_code, rec.error_type = status, etype
                resp.close()
                with contextlib.suppress(Exception):
                    await out.write_eof()
            else:
                resp.release()
        finally:
            if tap.first_token_at is not None:
                rec.ttft_ms = (tap.first_token_at - t0) * 1000
            if tap.error_type is not None and rec.status_code < 400:  # an error event mid-stream
                rec.status_code = errors.ANTHROPIC_STATUS.get(tap.error_type, 500)
                rec.error_type = tap.error_type
            rec.usage = tap.usage
            rec.response_model = tap.response_model or rec.response_model
            rec.latency_ms = (time.perf_counter() - t0) * 1000
            assert self.recorder is not None
            self.recorder.record(rec)
        return out


async def start_proxy(
    settings: Settings,
    publisher: RawPublisher | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
) -> ProxyServer:
    """Start the proxy in the running event loop; returns the started `ProxyServer`.

    Without `publisher`, events go to Kafka (settings.kafka) through a SpoolingPublisher
    spooling under ``<data_dir>/spool/proxy``, owned and closed by the server.
    `host` / `port` override settings.proxy (port 0 = a free port; see `server.port`).
    """
    return await ProxyServer(settings, publisher, host, port).start()
