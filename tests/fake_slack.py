"""A local Slack: the Web API's chat.postMessage (threads too) and chat.update, and the
incoming-webhook protocol.

It records every message it accepted and every attempt (with the time it arrived),
and can be told to answer the next requests with 429 + Retry-After or 5xx, as Slack
does under rate limits and outages. Point slack-sdk at it with
``AsyncWebClient(base_url=fake.api_base_url)`` or the webhook URL ``fake.webhook_url()``.
A posted message gets a `ts`; a reply (``thread_ts``) must name a message of its channel;
chat.update replaces a message's text and blocks in place (the message in `messages` is
the current one) and is recorded in `edits`; an unknown ts is ``message_not_found``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

NOTIFICATION_ID = re.compile(r"notification `([0-9a-f]+)`")


@dataclass
class Message:
    at: float  # time.monotonic() on arrival
    kind: str  # "web" or "webhook"
    path: str
    channel: str | None
    text: str
    blocks: list[dict[str, Any]]
    ts: str = ""
    thread_ts: str | None = None  # a reply in this message's thread
    edits: int = 0  # how many times chat.update changed it

    @property
    def notification_id(self) -> str | None:
        for b in self.blocks:
            for el in b.get("elements", []):
                m = NOTIFICATION_ID.search(str(el.get("text", "")))
                if m:
                    return m.group(1)
        return None

    @property
    def header(self) -> str:
        for b in self.blocks:
            if b.get("type") == "header":
                return str(b["text"]["text"])
        return ""

    @property
    def body_text(self) -> str:
        """Every section's text, joined."""
        return "\n".join(
            str(b["text"]["text"]) for b in self.blocks if b.get("type") == "section"
        )


@dataclass
class Edit:
    at: float
    channel: str
    ts: str
    text: str
    blocks: list[dict[str, Any]]


@dataclass
class Attempt:
    at: float
    path: str
    status: int
    notification_id: str | None


@dataclass
class Scripted:
    status: int
    retry_after: float | None = None


@dataclass
class FakeSlack:
    token: str = "xoxb-test-token"
    channels: set[str] = field(default_factory=lambda: {"#alerts", "C0ALERTS"})
    webhook_paths: set[str] = field(default_factory=lambda: {"/services/T000/B000/XXXX"})
    messages: list[Message] = field(default_factory=list)
    edits: list[Edit] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    script: deque[Scripted] = field(default_factory=deque)
    always: dict[str, int] = field(default_factory=dict)  # path -> status to always answer

    def __post_init__(self) -> None:
        self._lock = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control -----------------------------------------------------------------------

    def start(self) -> FakeSlack:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                return

            def do_POST(self) -> None:
                fake._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeSlack:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def api_base_url(self) -> str:
        return f"{self.url}/api/"

    def webhook_url(self, path: str | None = None) -> str:
        path = path or sorted(self.webhook_paths)[0]
        self.webhook_paths.add(path)
        return f"{self.url}{path}"

    def fail_next(self, status: int, times: int = 1, retry_after: float | None = None) -> None:
        with self._lock:
            for _ in range(times):
                self.script.append(Scripted(status, retry_after))

    def wait_for(
        self,
        predicate: Callable[[list[Message]], bool],
        timeout: float = 60.0,
        what: str = "messages",
    ) -> list[Message]:
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"fake Slack: timed out waiting for {what}; got {len(self.messages)}: "
                        + "; ".join(m.header for m in self.messages)
                    )
                self._lock.wait(min(left, 0.5))
            return list(self.messages)

    def wait_count(self, n: int, timeout: float = 60.0, path: str | None = None) -> list[Message]:
        return self.wait_for(
            lambda ms: len([m for m in ms if path is None or m.path == path]) >= n,
            timeout,
            f"{n} messages" + (f" on {path}" if path else ""),
        )

    def snapshot(self, path: str | None = None) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if path is None or m.path == path]

    def top_level(self) -> list[Message]:
        """Messages posted to a channel (what pings it), not replies in a thread."""
        with self._lock:
            return [m for m in self.messages if m.thread_ts is None]

    def replies(self, ts: str) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if m.thread_ts == ts]

    def delete(self, ts: str) -> None:
        """Someone deleted a message: chat.update of it answers message_not_found."""
        with self._lock:
            self.messages = [m for m in self.messages if m.ts != ts]

    # -- protocol ----------------------------------------------------------------------

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        arrived = time.monotonic()
        length = int(req.headers.get("Content-Length") or 0)
        raw = req.rfile.read(length) if length else b""
        path = req.path.split("?", 1)[0]
        ctype = (req.headers.get("Content-Type") or "").split(";")[0].strip()
        body: dict[str, Any]
        try:
            if ctype == "application/json":
                body = json.loads(raw or b"{}")
            else:
                body = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
        except ValueError:
            body = {}
        blocks = body.get("blocks") or []
        if isinstance(blocks, str):
            try:
                blocks = json.loads(blocks)
            except ValueError:
                blocks = []
        msg = Message(arrived, "", path, body.get("channel"), str(body.get("text") or ""), list(blocks))
        msg.thread_ts = str(body["thread_ts"]) if body.get("thread_ts") else None
        msg.ts = str(body.get("ts") or "")  # chat.update names the message it edits

        if path.startswith("/api/"):
            self._web_api(req, path[len("/api/") :], msg, arrived)
        elif path in self.webhook_paths:
            self._webhook(req, path, msg, arrived)
        else:
            self._reply(req, 404, "no_service", "text/html", path, arrived, msg)

    def _scripted(self, path: str) -> Scripted | None:
        with self._lock:
            if path in self.always:
                return Scripted(self.always[path])
            return self.script.popleft() if self.script else None

    def _web_api(self, req: BaseHTTPRequestHandler, method: str, msg: Message, arrived: float) -> None:
        msg.kind = "web"
        if method not in ("chat.postMessage", "chat.update"):
            self._json(req, 200, {"ok": False, "error": "unknown_method"}, msg.path, arrived, msg)
            return
        scripted = self._scripted(msg.path)
        if scripted is not None:
            self._fail(req, scripted, msg, arrived, web=True)
            return
        if req.headers.get("Authorization") != f"Bearer {self.token}":
            self._json(req, 200, {"ok": False, "error": "invalid_auth"}, msg.path, arrived, msg)
            return
        if not msg.channel:
            self._json(req, 200, {"ok": False, "error": "channel_not_found"}, msg.path, arrived, msg)
            return
        if msg.channel not in self.channels:
            self._json(req, 200, {"ok": False, "error": "channel_not_found"}, msg.path, arrived, msg)
            return
        if not msg.text and not msg.blocks:
            self._json(req, 200, {"ok": False, "error": "no_text"}, msg.path, arrived, msg)
            return
        if len(msg.blocks) > 50:
            self._json(req, 200, {"ok": False, "error": "invalid_blocks"}, msg.path, arrived, msg)
            return
        if method == "chat.update":
            self._update(req, msg, arrived)
            return
        if msg.thread_ts is not None and not any(
            m.ts == msg.thread_ts and m.channel == msg.channel for m in self.snapshot()
        ):
            self._json(req, 200, {"ok": False, "error": "thread_not_found"}, msg.path, arrived, msg)
            return
        with self._lock:
            ts = f"{time.time():.6f}"
            while any(m.ts == ts for m in self.messages):  # unique, as Slack's are
                ts = f"{float(ts) + 0.000001:.6f}"
            msg.ts = ts
        self._accept(msg)
        self._json(
            req,
            200,
            {"ok": True, "channel": msg.channel, "ts": ts, "message": {"text": msg.text, "ts": ts}},
            msg.path,
            arrived,
            msg,
        )

    def _update(self, req: BaseHTTPRequestHandler, msg: Message, arrived: float) -> None:
        with self._lock:
            target = next(
                (m for m in self.messages if m.ts == msg.ts and m.channel == msg.channel and m.kind == "web"),
                None,
            )
            if target is not None:
                target.text, target.blocks = msg.text, msg.blocks
                target.edits += 1
                self.edits.append(Edit(arrived, str(msg.channel), msg.ts, msg.text, msg.blocks))
                self._lock.notify_all()
        if target is None:
            self._json(req, 200, {"ok": False, "error": "message_not_found"}, msg.path, arrived, msg)
            return
        self._json(
            req,
            200,
            {"ok": True, "channel": msg.channel, "ts": msg.ts, "text": msg.text},
            msg.path,
            arrived,
            msg,
        )

    def wait_edits(self, n: int, timeout: float = 60.0) -> list[Edit]:
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.edits) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"fake Slack: timed out waiting for {n} edits; got {len(self.edits)}")
                self._lock.wait(min(left, 0.5))
            return list(self.edits)

    def _webhook(self, req: BaseHTTPRequestHandler, path: str, msg: Message, arrived: float) -> None:
        msg.kind = "webhook"
        scripted = self._scripted(path)
        if scripted is not None:
            self._fail(req, scripted, msg, arrived, web=False)
            return
        if not msg.text and not msg.blocks:
            self._reply(req, 400, "no_text", "text/html", path, arrived, msg)
            return
        if len(msg.blocks) > 50:
            self._reply(req, 400, "invalid_blocks", "text/html", path, arrived, msg)
            return
        self._accept(msg)
        self._reply(req, 200, "ok", "text/html", path, arrived, msg)

    def _fail(self, req: BaseHTTPRequestHandler, s: Scripted, msg: Message, arrived: float, web: bool) -> None:
        headers = {"Retry-After": f"{s.retry_after:g}"} if s.retry_after is not None else {}
        if s.status == 429:
            if web:
                self._json(req, 429, {"ok": False, "error": "ratelimited"}, msg.path, arrived, msg, headers)
            else:
                self._reply(req, 429, "rate_limited", "text/html", msg.path, arrived, msg, headers)
        else:
            self._reply(req, s.status, "Internal Server Error", "text/html", msg.path, arrived, msg, headers)

    def _accept(self, msg: Message) -> None:
        with self._lock:
            self.messages.append(msg)
            self._lock.notify_all()

    def _json(
        self,
        req: BaseHTTPRequestHandler,
        status: int,
        payload: dict[str, Any],
        path: str,
        arrived: float,
        msg: Message,
        headers: dict[str, str] | None = None,
    ) -> None:
        self._reply(req, status, json.dumps(payload), "application/json", path, arrived, msg, headers)

    def _reply(
        self,
        req: BaseHTTPRequestHandler,
        status: int,
        text: str,
        ctype: str,
        path: str,
        arrived: float,
        msg: Message,
        headers: dict[str, str] | None = None,
    ) -> None:
        with self._lock:
            self.attempts.append(Attempt(arrived, path, status, msg.notification_id))
            self._lock.notify_all()
        data = text.encode()
        req.send_response(status)
        req.send_header("Content-Type", f"{ctype}; charset=utf-8")
        req.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            req.send_header(k, v)
        req.end_headers()
        req.wfile.write(data)
