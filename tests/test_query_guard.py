"""The query API reads llmpulse's tables and nothing else, on every path a user can reach:

- the store owner's query endpoint (what the sink serves), over HTTP;
- the dashboard's `/api/query` (which goes through that owner, as in production);
- `llmpulse query`, both through the owner and opening a store directly (no owner).

Each gets the same attacks, against a real chDB store: files (`file()`), the network
(`url()`, `remote()`, `s3()`), a system table outside the allow-list, and over-limit scans,
written the ways a text filter would miss (case, comments, quoting, WITH, JOIN, UNION, IN).
Every one must be refused with its reason (HTTP 403 or 400 with a JSON error; the CLI exits 1
with the reason) and nothing of the file or the URL may come back. Legitimate queries, those
of the dashboard's panels among them, still answer.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmpulse.analysis.api import DashboardServer, is_loopback
from llmpulse.analysis.query_guard import QueryRefused, check_ast
from llmpulse.analysis.query_server import QueryServer
from llmpulse.analysis.readonly import QueryLimits
from llmpulse.config import ConfigError, load_settings
from llmpulse.embedded.store import open_store
from llmpulse.sinks.clickhouse.migrate import migrate
from tests.test_dashboard_api import Dash, demo_calls, write

N = 3000  # demo_calls(): rows in llmpulse.llm_calls
MAX_ROWS_TO_READ = 10_000  # four scans of llm_calls (12,000 rows) are over it
MAX_SECONDS = 1.5


class Canary:
    """An HTTP server on loopback that counts the requests it gets (url() must never reach it)."""

    def __init__(self) -> None:
        self.hits = 0
        canary = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                canary.hits += 1
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"canary-secret\n")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/x"


def attacks(canary: Canary, secret: Path) -> list[tuple[str, str, int, str]]:
    """(what, sql, HTTP status, words the reason must hold)."""
    f, u = str(secret), canary.url
    tf = "is not allowed"
    return [
        ("file()", f"SELECT * FROM file('{f}', 'LineAsString')", 403, "table function file()"),
        ("file() by case and comment", f"select * /* x */ from FILE('{f}','LineAsString') -- y", 403, "table function FILE()"),
        ("file() beside a llmpulse table", f"SELECT * FROM llmpulse.llm_calls AS c, file('{f}', 'LineAsString') LIMIT 1", 403, tf),
        ("file() in WITH", f"WITH s AS (SELECT * FROM file('{f}', 'LineAsString')) SELECT * FROM s", 403, tf),
        ("file() as a function", f"SELECT file('{f}')", 403, "function file()"),
        ("url()", f"SELECT * FROM url('{u}', 'LineAsString')", 403, "table function url()"),
        ("url() in a JOIN", f"SELECT * FROM llmpulse.llm_calls AS a JOIN url('{u}', 'LineAsString') AS b ON 1 = 1", 403, tf),
        ("url() in an IN subquery", f"SELECT 1 WHERE 'x' IN (SELECT * FROM url('{u}', 'LineAsString'))", 403, tf),
        ("remote()", "SELECT * FROM remote('127.0.0.1', system.one)", 403, "table function remote()"),
        ("s3()", f"SELECT * FROM s3('{u}/bucket/key.csv', 'CSV')", 403, "table function s3()"),
        ("system table outside the allow-list", "SELECT name FROM system.users", 403, "table system.users is not readable"),
        ("system table, quoted, after UNION", "SELECT 'a' UNION ALL SELECT name FROM `system`.\"settings\"", 403, "system.settings"),
        ("system table as an IN set", "SELECT 1 WHERE 'default' IN system.users", 403, "system.users"),
        ("another database", "SELECT * FROM information_schema.tables", 403, "information_schema.tables"),
        ("merge() over other databases", "SELECT * FROM merge('system', '^users$')", 403, "table function merge()"),
        ("view() over another database", "SELECT * FROM view(SELECT name FROM system.users)", 403, "table function view()"),
        ("a table of the session's database", "SELECT * FROM llm_calls", 403, "not a WITH name"),
        ("a dictionary", "SELECT dictGet('d', 'x', toUInt64(1))", 403, "function dictGet()"),
        ("a Join table by name", "SELECT joinGet('system.users', 'name', 1)", 403, "function joinGet()"),
        ("SETTINGS lifting a limit", "SELECT count() FROM llmpulse.llm_calls SETTINGS max_rows_to_read = 0", 403, "SETTINGS"),
        ("a write", "INSERT INTO llmpulse.llm_calls (event_id) VALUES ('x')", 403, "read-only"),
        ("a second statement", "SELECT 1; DROP TABLE llmpulse.llm_calls", 403, "one statement per query"),
        ("a second statement first", "DROP TABLE llmpulse.llm_calls; SELECT 1", 403, "one statement per query"),
        ("a file written by INTO OUTFILE", f"SELECT event_id FROM llmpulse.llm_calls INTO OUTFILE '{f}.out'", 403,
         "INTO OUTFILE"),
        ("over-limit scan (numbers)", "SELECT count() FROM numbers(10000000000)", 403, "table function numbers()"),
        ("over-limit scan (rows read)",
         "SELECT count() FROM llmpulse.llm_calls a, llmpulse.llm_calls b, llmpulse.llm_calls c, llmpulse.llm_calls d",
         400, f"more than {MAX_ROWS_TO_READ:,} rows"),
        ("over-limit scan (time)", "SELECT count() FROM llmpulse.llm_calls a, llmpulse.llm_calls b, llmpulse.llm_calls c",
         400, f"past the {MAX_SECONDS:g} s limit"),
    ]  # fmt: skip


LEGIT = [
    ("SELECT count() FROM llmpulse.llm_calls FINAL;", [[N]]),
    ("WITH m AS (SELECT model FROM llmpulse.llm_calls FINAL) SELECT count() FROM m WHERE model IN m", [[N]]),
    ("SELECT count() FROM system.tables WHERE database = 'llmpulse' AND name = 'llm_calls'", [[1]]),
    ("SELECT 1 /* file('/etc/passwd') */ AS `url('x')`", [[1]]),
]


class World:
    def __init__(self, config: Path, direct_config: Path, qs: QueryServer, canary: Canary, secret: Path) -> None:
        self.config = config
        self.direct_config = direct_config
        self.qs = qs
        self.canary = canary
        self.secret = secret


def _config(path: Path, data_dir: Path) -> Path:
    path.write_text(yaml.safe_dump({"data_dir": str(data_dir), "clickhouse": {
        "query_max_rows_to_read": MAX_ROWS_TO_READ, "query_max_seconds": MAX_SECONDS}}))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("guard")
    secret = tmp / "secret.txt"
    secret.write_text("the-host-secret\n")
    # a second store that nobody owns: `llmpulse query` opens it directly. Filled and closed
    # before the owned one opens (a process holds one chDB store at a time)
    direct = _config(tmp / "direct.yaml", tmp / "direct-data")
    dsettings = load_settings(direct, environ={})
    dstore = open_store(dsettings.clickhouse, dsettings.data_dir, {"role": "test-fill"})
    try:
        migrate(dstore.client, dsettings.clickhouse)
        write(dstore.client, "llm_calls", demo_calls())
    finally:
        dstore.close()
    config = _config(tmp / "llmpulse.yaml", tmp / "data")
    settings = load_settings(config, environ={})
    ch = settings.clickhouse
    store = open_store(ch, settings.data_dir, {"role": "test-sink"})
    try:
        migrate(store.client, ch)
        write(store.client, "llm_calls", demo_calls())
        # served as `llmpulse sink` serves it, limits from the config
        qs = QueryServer(store.client, ch.database, ch.query_max_rows, ch.query_max_seconds,
                         limits=QueryLimits.of(ch)).start()  # fmt: skip
        assert store.lock is not None
        store.lock.write_info({"role": "test-sink", "query_url": qs.url})
        yield World(config, direct, qs, Canary(), secret)
        qs.stop()
    finally:
        store.close()


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def assert_refused(what: str, code: int, body: dict[str, Any], status: int, reason: str, world: World) -> None:
    assert code == status and reason in body.get("error", ""), (what, code, body)
    text = json.dumps(body)
    assert "the-host-secret" not in text and "canary-secret" not in text, (what, body)
    assert not world.secret.with_name(world.secret.name + ".out").exists(), what


def test_query_endpoint_of_the_store_owner(world: World) -> None:
    for what, sql, status, reason in attacks(world.canary, world.secret):
        code, body = post(f"{world.qs.url}/query", {"sql": sql})
        assert_refused(what, code, body, status, reason, world)
    for sql, rows in LEGIT:
        code, body = post(f"{world.qs.url}/query", {"sql": sql})
        assert code == 200 and body["rows"] == rows, (sql, body)
    # a request may lower the owner's limits, never raise them
    code, body = post(f"{world.qs.url}/query", {"sql": "SELECT count() FROM llmpulse.llm_calls a, "
                                                       "llmpulse.llm_calls b, llmpulse.llm_calls c", "max_seconds": 600})  # fmt: skip
    assert code == 400 and f"past the {MAX_SECONDS:g} s limit" in body["error"], body
    assert world.canary.hits == 0


def test_dashboard_api_query(world: World) -> None:
    settings = load_settings(world.config, environ={}, overrides={"dashboard.port": 0})
    dash = Dash(settings)
    try:
        for what, sql, status, reason in attacks(world.canary, world.secret):
            for send in ("POST", "GET"):
                if send == "POST":
                    code, body, _ = dash.get("/api/query", data=json.dumps({"sql": sql}).encode(),
                                             headers={"Content-Type": "application/json"})  # fmt: skip
                else:
                    code, body, _ = dash.get("/api/query?" + urllib.parse.urlencode({"sql": sql}))
                assert_refused(f"{what} ({send})", code, body, status, reason, world)
        for sql, rows in LEGIT:
            code, body, _ = dash.get("/api/query?" + urllib.parse.urlencode({"sql": sql}))
            assert code == 200 and body["rows"] == rows, (sql, body)
        # the panels' own queries pass the same guard
        code, s, _ = dash.get("/api/summary?from=now-1d&to=now")
        assert code == 200 and s["requests"] == N, s
        for path in ("/api/timeseries?from=now-1d&to=now", "/api/calls?from=now-1d&to=now",
                     "/api/options?from=now-1d&to=now", "/api/alerts?from=now-1d&to=now"):  # fmt: skip
            code, body, _ = dash.get(path)
            assert code == 200, (path, body)
    finally:
        dash.close()
    assert world.canary.hits == 0


def cli(config: Path, sql: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmpulse", "--config", str(config), "query", sql],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.mark.parametrize("path", ["through the owner", "opening the store directly"])
def test_llmpulse_query_cli(world: World, path: str) -> None:
    config = world.config if path == "through the owner" else world.direct_config
    cases = attacks(world.canary, world.secret)
    # every attack of a kind once through the CLI (each run is a process start)
    picked = [c for c in cases if c[0] in ("file()", "file() as a function", "url()", "remote()", "s3()",
                                            "system table outside the allow-list", "SETTINGS lifting a limit",
                                            "a file written by INTO OUTFILE", "a second statement",
                                            "over-limit scan (numbers)", "over-limit scan (rows read)")]  # fmt: skip
    picked.append(next(c for c in cases if c[0] == "over-limit scan (time)"))
    for what, sql, _status, reason in picked:
        r = cli(config, sql)
        assert r.returncode == 1 and reason in r.stderr and "llmpulse: error: " in r.stderr, (what, r.stderr)
        assert "Traceback" not in r.stderr and "the-host-secret" not in r.stdout + r.stderr, (what, r)
        assert not world.secret.with_name(world.secret.name + ".out").exists(), what
    r = cli(config, "SELECT count() FROM llmpulse.llm_calls")
    assert r.returncode == 0 and r.stdout.split()[2] == str(N), r
    assert world.canary.hits == 0


def test_dashboard_without_a_token_stays_on_loopback(world: World) -> None:
    settings = load_settings(world.config, environ={}, overrides={"dashboard.port": 0})
    for host in ("0.0.0.0", "::", "192.0.2.1", "dashboard.example"):
        with pytest.raises(ConfigError, match="without a token"):
            DashboardServer(settings, None, host=host)
    # loopback without a token, and any address with one, start
    assert is_loopback("::1") and is_loopback("127.0.0.2") and not is_loopback("::")
    for host, token in (("127.0.0.1", None), ("localhost", None), ("0.0.0.0", "t0ken")):
        server = DashboardServer(settings, token, host=host, port=0)
        asyncio.run(_start_stop(server))


async def _start_stop(server: DashboardServer) -> None:
    await server.start()
    await server.stop()


def test_the_cli_refuses_to_start_the_dashboard_open_on_every_interface(world: World) -> None:
    r = subprocess.run([sys.executable, "-m", "llmpulse", "--config", str(world.config), "dashboard",
                        "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin"})  # fmt: skip
    assert r.returncode == 2 and "without a token" in r.stderr and "LLMPULSE_SECRET_DASHBOARD_TOKEN" in r.stderr, r


def test_a_cut_parse_tree_is_refused() -> None:
    """A server profile's result-row limit could cut EXPLAIN AST short and hide part of a query."""
    lines = ["SelectWithUnionQuery (children 2)", " ExpressionList (children 1)", "  SelectQuery (children 2)",
             "   ExpressionList (children 1)", "    Asterisk"]  # fmt: skip
    with pytest.raises(QueryRefused, match="incomplete"):
        check_ast(lines, "llmpulse")
