"""The query endpoint of the process that owns the embedded store.

Only one process may hold a chDB directory; that process (the sink) answers read-only
queries for the others (`llmpulse query`, the dashboard) over loopback HTTP. It also
serves the sink's Prometheus `/metrics` (batch sizes, INSERT latency, rows written).

Every query goes through `readonly.run_readonly` here, in the owner, whoever sends it: what
it reads is checked (llmpulse's tables and allow-listed system tables only) and it runs
read-only within this process's limits, which a request may lower but never raise. A
refusal answers 403 (not allowed) or 400 (over a limit, bad SQL) with `{"error": reason}`.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from llmpulse.analysis.readonly import QueryLimits, QueryRefused, QueryResult, run_readonly
from llmpulse.errors import LLMPulseError

log = logging.getLogger(__name__)


class QueryRequest(BaseModel):
    sql: str = Field(min_length=1, max_length=100_000)
    max_rows: int | None = Field(default=None, ge=1)
    max_seconds: float | None = Field(default=None, gt=0)


class QueryServer:
    def __init__(
        self, client: Any, database: str, max_rows: int, max_seconds: float, host: str = "127.0.0.1", port: int = 0,
        limits: QueryLimits | None = None,
    ) -> None:
        self.client = client
        self.limits = limits or QueryLimits()
        self.database = database
        self.max_rows = max_rows
        self.max_seconds = max_seconds
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug(fmt, *args)

            def do_POST(self) -> None:
                if self.path != "/query":
                    self._send(404, {"error": "not found"})
                    return
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    req = QueryRequest.model_validate_json(self.rfile.read(min(length, 200_000)))
                except ValidationError as exc:
                    self._send(400, {"error": f"bad request: {exc.errors()[0]['msg']}"})
                    return
                try:
                    res = server.execute(req)
                except QueryRefused as exc:
                    self._send(exc.status, {"error": str(exc)})
                    return
                except LLMPulseError as exc:
                    self._send(400, {"error": str(exc)})
                    return
                self._send(200, res.model_dump())

            def do_GET(self) -> None:
                if self.path == "/healthz":
                    self._send(200, {"ok": True})
                elif self.path == "/metrics":
                    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

                    data = generate_latest()
                    self.send_response(200)
                    self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                else:
                    self._send(404, {"error": "not found"})

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="query-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def execute(self, req: QueryRequest) -> QueryResult:
        max_rows = min(req.max_rows or self.max_rows, self.max_rows)
        max_seconds = min(req.max_seconds or self.max_seconds, self.max_seconds)
        return run_readonly(self.client, req.sql, self.database, max_rows, max_seconds, self.limits)

    def start(self) -> QueryServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
