"""The dashboard's HTTP server (aiohttp): the page, its JSON API, read-only SQL, /metrics.

    GET  /                      the dashboard (static/index.html)
    GET  /static/plotly.min.js  plotly.js from the installed `plotly` wheel
    GET  /api/summary|timeseries|gpu|host|alerts|calls|options   panels (time range + filters)
    GET  /api/slo               each SLO rule's error budget left over its period, up to the range's end
    GET  /api/calls/{event_id}  one call; prompt/response only when they were captured
    GET|POST /api/query         read-only SQL with a row and time limit
    GET  /metrics               Prometheus exposition of the pipeline metrics of this process and the
                                gen_ai_* LLM metrics from the aggregates (llmpulse.sinks.prometheus)
    GET  /healthz

Panels and /api/query go through `llmpulse.analysis.client.query`: the embedded store's
owner (the sink) when one runs, the store itself otherwise, or a ClickHouse server.
Either way `readonly.run_readonly` checks what a query reads (llmpulse's tables and a few
system tables; no table functions such as file() or url()) and runs it read-only within
the limits; a refusal is 403 (not allowed) or 400 (over a limit), with `{"error": reason}`.
With LLMPULSE_SECRET_DASHBOARD_TOKEN set every route but /healthz needs
`Authorization: Bearer <token>` or the cookie that `/?token=<token>` sets. Without a token
the server binds loopback only: `DashboardServer` refuses any other address (anyone who
could reach the port would otherwise read every call's data).
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.util
import ipaddress
import json
import logging
import os
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel, Field, ValidationError

from llmpulse.analysis import panels
from llmpulse.analysis.readonly import QueryRefused, QueryResult
from llmpulse.analysis.report import SloPanel, slo_panel
from llmpulse.config import ConfigError, Settings
from llmpulse.config.dashboard import TOKEN_ENV
from llmpulse.errors import LLMPulseError

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
COOKIE = "llmpulse_dashboard_token"
QueryFn = Callable[[Settings, str, int | None], QueryResult]


def plotly_js_path() -> Path:
    """plotly.min.js inside the installed plotly wheel (never copied into this repository)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise LLMPulseError("the dashboard's charts need the plotly package: pip install 'llmpulse[all]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "package_data" / "plotly.min.js"
    if not path.exists():
        raise LLMPulseError(f"plotly is installed but {path} is missing")
    return path


class QueryBody(BaseModel):
    sql: str = Field(min_length=1, max_length=100_000)
    max_rows: int | None = Field(default=None, ge=1)


class DashboardState:
    def __init__(self, settings: Settings, token: str | None, query_fn: QueryFn | None = None) -> None:
        from llmpulse.analysis.client import query

        cfg = settings.dashboard
        ch = settings.clickhouse
        # the dashboard's limits apply on top of the store's own
        limited = ch.model_copy(update={
            "query_max_rows": min(cfg.query_max_rows, ch.query_max_rows),
            "query_max_seconds": min(cfg.query_max_seconds, ch.query_max_seconds),
        })  # fmt: skip
        self.settings = settings.model_copy(update={"clickhouse": limited})
        self.cfg = cfg
        self.db = ch.database
        self.token = token or None
        self.query_fn: QueryFn = query_fn or query
        self.plotly = plotly_js_path()
        from llmpulse.analysis.lag import LagSampler

        self.lag = LagSampler(settings)

    def run(self, sql: str, max_rows: int | None = None) -> QueryResult:
        return self.query_fn(self.settings, sql, max_rows)

    def filters(self, request: web.Request, default_range: timedelta = timedelta(hours=1)) -> panels.Filters:
        try:
            return panels.Filters.from_params(
                dict(request.query), default_range, timedelta(days=self.cfg.max_range_days)
            )
        except ValidationError as exc:
            raise LLMPulseError(f"bad filter: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}") from None


_STATE = web.AppKey("state", DashboardState)


def _json(data: Any, status: int = 200) -> web.Response:
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    return web.Response(text=json.dumps(data, default=str), status=status, content_type="application/json")


def _authorized(request: web.Request, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode()):
        return True
    cookie = request.cookies.get(COOKIE, "")
    return bool(cookie) and hmac.compare_digest(cookie.encode(), token.encode())


LOGIN_PAGE = """<!doctype html><meta charset="utf-8"><title>llmpulse</title>
<body style="font-family:sans-serif;margin:3em"><h2>llmpulse dashboard</h2>
<p>This dashboard needs its token (LLMPULSE_SECRET_DASHBOARD_TOKEN).</p>
<form method="get" action="/"><input name="token" type="password" placeholder="token" autofocus>
<button>Open</button></form></body>"""


@web.middleware
async def auth_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    state: DashboardState = request.app[_STATE]
    if state.token is None or request.path == "/healthz":
        return await handler(request)
    given = request.query.get("token")
    if request.path == "/" and given is not None:
        if not hmac.compare_digest(given.encode(), state.token.encode()):
            return web.Response(text=LOGIN_PAGE, status=401, content_type="text/html")
        rest = {k: v for k, v in request.query.items() if k != "token"}
        target = "/" + (f"?{urlencode(rest)}" if rest else "")
        resp = web.HTTPFound(target)
        resp.set_cookie(COOKIE, state.token, httponly=True, samesite="Strict", secure=request.secure)
        raise resp
    if _authorized(request, state.token):
        return await handler(request)
    if request.path == "/":
        return web.Response(text=LOGIN_PAGE, status=401, content_type="text/html")
    return _json({"error": "a valid bearer token is required (Authorization: Bearer <token>)"}, 401)


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    try:
        return await handler(request)
    except QueryRefused as exc:
        return _json({"error": str(exc)}, exc.status)
    except LLMPulseError as exc:
        return _json({"error": str(exc)}, 400)


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


async def index(request: web.Request) -> web.StreamResponse:
    state: DashboardState = request.app[_STATE]
    html = (STATIC / "index.html").read_text()
    html = html.replace("__REFRESH_S__", str(state.cfg.refresh_s))
    return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})


async def plotly_js(request: web.Request) -> web.StreamResponse:
    state: DashboardState = request.app[_STATE]
    return web.FileResponse(state.plotly, headers={"Content-Type": "application/javascript", "Cache-Control": "max-age=86400"})


async def static_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    path = STATIC / name
    if "/" in name or name.startswith(".") or not path.is_file():
        raise web.HTTPNotFound()
    ctype = {"js": "application/javascript", "css": "text/css"}.get(name.rsplit(".", 1)[-1], "application/octet-stream")
    return web.FileResponse(path, headers={"Content-Type": ctype, "Cache-Control": "no-cache"})


async def api_summary(request: web.Request) -> web.StreamResponse:
    s: DashboardState = request.app[_STATE]
    f = s.filters(request)
    return _json(await _in_thread(panels.summary, s.run, s.db, f))


async def api_timeseries(request: web.Request) -> web.StreamResponse:
    s: DashboardState = request.app[_STATE]
    f = s.filters(request)
    by = request.query.get("by", "model")
    if by not in ("none", "model", "app", "user"):
        raise LLMPulseError("by must be none, model, app or user")
    return _json(await _in_thread(panels.timeseries, s.run, s.db, f, by, s.cfg.max_points, s.cfg.max_series,
                                  s.cfg.aggregate_window_s))  # fmt: skip


async def api_gpu(request: web.Request) -> web.StreamResponse:
    s: DashboardState = request.app[_STATE]
    return _json(await _in_thread(panels.gpu, s.run, s.db, s.filters(request), s.cfg.max_points))


async def api_host(request: web.Request) -> web.StreamResponse:
    s: DashboardState = request.app[_STATE]
    return _json(await _in_thread(panels.host, s.run, s.db, s.filters(request), s.cfg.max_points))


async def api_alerts(request: web.Request) -> web.StreamResponse:
    s: DashboardState = request.app[_STATE]
    fingerprint = request.query.get("fingerprint") or None
    return _json(await _in_thread(panels.alerts, s.run, s.db, s.filters(request), 200, fingerprint))


def _slo_panel(s: DashboardState, end: datetime) -> SloPanel:
    from llmpulse.streams.rules import SloRule, load_rules

    # read per request, as the worker reloads it: the panel follows the rules in force
    slos = [r for r in load_rules(s.settings.rules_file, None).rules if isinstance(r, SloRule)]
    return slo_panel(s.run, s.db, slos, end)


async def api_slo(request: web.Request) -> web.StreamResponse:
    s: DashboardState = request.app[_STATE]
    return _json(await _in_thread(_slo_panel, s, s.filters(request).end))


async def api_calls(request: web.Request) -> web.StreamResponse:
    s: DashboardState = request.app[_STATE]
    f = s.filters(request)
    try:
        limit = min(int(request.query.get("limit", s.cfg.calls_page_rows)), s.cfg.calls_page_rows)
        offset = max(0, int(request.query.get("offset", 0)))
    except ValueError:
        raise LLMPulseError("limit and offset must be integers") from None
    return _json(await _in_thread(panels.calls, s.run, s.db, f, max(1, limit), offset))


async def api_call(request: web.Request) -> web.StreamResponse:
    s: DashboardState = request.app[_STATE]
    detail = await _in_thread(panels.call_detail, s.run, s.db, request.match_info["event_id"])
    if detail is None:
        return _json({"error": "no such call"}, 404)
    return _json(detail)


async def api_options(request: web.Request) -> web.StreamResponse:
    s: DashboardState = request.app[_STATE]
    return _json(await _in_thread(panels.options, s.run, s.db, s.filters(request)))


async def api_query(request: web.Request) -> web.StreamResponse:
    s: DashboardState = request.app[_STATE]
    try:
        if request.method == "POST":
            body = QueryBody.model_validate_json(await request.read())
        else:
            body = QueryBody.model_validate(dict(request.query))
    except ValidationError as exc:
        return _json({"error": f"bad request: {exc.errors()[0]['msg']}"}, 400)
    res: QueryResult = await _in_thread(s.run, body.sql, body.max_rows)
    out = res.model_dump()
    if res.truncated:
        out["message"] = f"result cut at {res.max_rows} rows (the row limit)"
    return _json(out)


async def metrics_handler(request: web.Request) -> web.StreamResponse:
    state: DashboardState = request.app[_STATE]
    await _in_thread(state.lag.sample)
    body = await _in_thread(generate_latest, REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.StreamResponse:
    return _json({"ok": True})


def make_app(settings: Settings, token: str | None = None, query_fn: QueryFn | None = None) -> web.Application:
    app = web.Application(middlewares=[auth_middleware, error_middleware], client_max_size=256 * 1024)
    app[_STATE] = DashboardState(settings, token, query_fn)
    app.router.add_get("/", index)
    app.router.add_get("/static/plotly.min.js", plotly_js)
    app.router.add_get("/static/{name}", static_file)
    app.router.add_get("/api/summary", api_summary)
    app.router.add_get("/api/timeseries", api_timeseries)
    app.router.add_get("/api/gpu", api_gpu)
    app.router.add_get("/api/host", api_host)
    app.router.add_get("/api/alerts", api_alerts)
    app.router.add_get("/api/slo", api_slo)
    app.router.add_get("/api/calls", api_calls)
    app.router.add_get("/api/calls/{event_id}", api_call)
    app.router.add_get("/api/options", api_options)
    app.router.add_route("GET", "/api/query", api_query)
    app.router.add_route("POST", "/api/query", api_query)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    return app


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost); a name or
    wildcard (0.0.0.0, ::, "") is not, whatever it resolves to later."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def token_from_env(environ: dict[str, str] | None = None) -> str | None:
    return (environ if environ is not None else os.environ).get(TOKEN_ENV) or None


class DashboardServer:
    """The app on host:port in a running event loop (the CLI and tests)."""

    def __init__(self, settings: Settings, token: str | None = None, host: str | None = None, port: int | None = None) -> None:
        self.host = host or settings.dashboard.host
        if not token and not is_loopback(self.host):
            raise ConfigError(
                f"dashboard.host: refusing to serve the dashboard on {self.host} without a token: anyone who "
                f"can reach it would read every call. Set {TOKEN_ENV}, or bind to 127.0.0.1 (the default)"
            )
        self.app = make_app(settings, token)
        self.port = settings.dashboard.port if port is None else port
        self.runner = web.AppRunner(self.app, access_log=None)
        self.app_token = token
        self.settings = settings
        # gen_ai_* metrics on /metrics, from the worker's aggregates (llmpulse.sinks.prometheus)
        self.llm_metrics: Any = None

    async def start(self) -> str:
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, reuse_address=True)
        await site.start()
        server: Any = site._server
        if server is not None and getattr(server, "sockets", None):
            self.port = int(server.sockets[0].getsockname()[1])
        if self.settings.llm_metrics.enabled and self.llm_metrics is None:  # once the server listens
            from llmpulse.sinks.prometheus import AggregateMetricsConsumer

            self.llm_metrics = AggregateMetricsConsumer(self.settings).start()
        return self.url

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()
        if self.llm_metrics is not None:
            await asyncio.to_thread(self.llm_metrics.stop)
            self.llm_metrics = None
