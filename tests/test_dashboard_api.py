"""The dashboard's HTTP API against a real chDB store served the way the sink serves it.

The store is opened once, migrated, filled through the sink's own row specs and writer,
and answered by the sink's query server (the store's owner); the dashboard reaches it
through `llmpulse.analysis.client.query`, as in production.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from llmpulse.analysis.api import DashboardServer
from llmpulse.analysis.query_server import QueryServer
from llmpulse.config import Settings, load_settings
from llmpulse.embedded.store import Store, open_store
from llmpulse.schemas import CallEvent, GpuSample
from llmpulse.schemas.aggregate import WindowAggregate, aggregate_id, dimensions_key
from llmpulse.schemas.alert import Alert, alert_fingerprint
from llmpulse.schemas.base import WireModel
from llmpulse.sinks.clickhouse.migrate import migrate

MODELS = ["gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet"]
APPS = ["support-bot", "search"]
T0 = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)  # inside every TTL
N = 3000  # one call every 100 ms: five minutes


def demo_calls() -> list[CallEvent]:
    rng = random.Random(7)
    out = []
    for i in range(N):
        err = rng.random() < 0.1
        out.append(CallEvent(
            event_id=f"c{i:05d}", ts=T0 + timedelta(milliseconds=100 * i), model=MODELS[i % 3],
            app=APPS[i % 2], user=f"u{i % 5}", status_code=429 if err else 200,
            error_type="rate_limited" if err else None, latency_ms=rng.uniform(100, 900),
            ttft_ms=rng.uniform(20, 80), prompt_tokens=100, completion_tokens=i % 50,
            cost_usd=0.001, prompt="hello" if i == 0 else None, response="hi" if i == 0 else None,
        ))  # fmt: skip
    return out


def window_aggregates(calls: list[CallEvent], window_s: int, dim: str | None) -> list[WindowAggregate]:
    acc: dict[tuple[int, str], list[CallEvent]] = {}
    for c in calls:
        ms = int(c.ts.timestamp() * 1000)
        start = ms - ms % (window_s * 1000)
        acc.setdefault((start, getattr(c, dim) if dim else ""), []).append(c)
    out = []
    for (start, value), cs in acc.items():
        dims = {dim: value} if dim else {}
        dk = dimensions_key(dims)
        lat = sorted(c.latency_ms for c in cs)
        errors = sum(1 for c in cs if c.error_type)
        out.append(WindowAggregate(
            aggregate_id=aggregate_id("calls", window_s, start, dk), kind="calls", window_s=window_s,
            window_start=datetime.fromtimestamp(start / 1000, UTC),
            window_end=datetime.fromtimestamp(start / 1000 + window_s, UTC), dimensions=dims, dims_key=dk,
            requests=len(cs), errors=errors, qps=len(cs) / window_s, error_rate=errors / len(cs),
            success_rate=1 - errors / len(cs), latency_sum_ms=sum(lat), latency_p95_ms=lat[int(0.95 * (len(lat) - 1))],
            total_tokens=sum(c.total_tokens or 0 for c in cs), cost_usd=sum(c.cost_usd or 0 for c in cs),
        ))  # fmt: skip
    return out


def write(client: Any, table: str, events: Sequence[WireModel]) -> None:
    """Rows of the events' fields by column name (columns the model lacks take their defaults)."""
    cols = [(n, t) for n, t, dk in client.query(f"SELECT name, type, default_kind FROM system.columns "
                                                 f"WHERE database = 'llmpulse' AND table = '{table}'").result_rows if not dk]  # fmt: skip
    rows = []
    for e in events:
        row = []
        for name, typ in cols:
            v = getattr(e, name, None)
            if isinstance(v, list | dict) and "String" in typ and "Map" not in typ:
                v = json.dumps(v)
            if v is None and not typ.startswith("Nullable"):
                v = "" if "String" in typ else 0
            if isinstance(v, bool) and "Int" in typ:
                v = int(v)
            row.append(v)
        rows.append(row)
    client.insert(f"llmpulse.{table}", rows, column_names=[n for n, _ in cols])


class Served:
    def __init__(self, settings: Settings, store: Store, qs: QueryServer) -> None:
        self.settings = settings
        self.store = store
        self.qs = qs
        self.calls = demo_calls()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A migrated chDB store with demo rows, owned by this process and served like the sink serves it."""
    tmp = tmp_path_factory.mktemp("dash-store")
    settings = load_settings(None, environ={}, overrides={"data_dir": str(tmp / "data"), "dashboard.port": 0})
    ch = settings.clickhouse
    store = open_store(ch, settings.data_dir, {"role": "test-sink"})
    migrate(store.client, ch)
    qs = QueryServer(store.client, ch.database, ch.query_max_rows, ch.query_max_seconds).start()
    assert store.lock is not None
    store.lock.write_info({"role": "test-sink", "query_url": qs.url})
    s = Served(settings, store, qs)
    w = store.client
    write(w, "llm_calls", s.calls)
    aggs = [a for d in (None, "model", "app") for a in window_aggregates(s.calls, 60, d)]
    write(w, "llm_aggregates", aggs)
    gpus = [GpuSample(ts=T0 + timedelta(seconds=5 * i), host="h1", gpu_index=i % 2, utilization_gpu_pct=50.0,
                      memory_used_bytes=2**33, memory_total_bytes=2**35, temperature_c=60.0) for i in range(60)]  # fmt: skip
    write(w, "gpu_samples", gpus)
    dims = {"model": "gpt-4o-mini"}
    alert = Alert(fingerprint=alert_fingerprint("success_rate", dims), rule="success_rate", severity="critical",
                  state="firing", metric="success_rate", value=0.8, threshold=0.95, dimensions=dims,
                  window_start=T0 + timedelta(minutes=1), window_end=T0 + timedelta(minutes=2),
                  started_at=T0 + timedelta(minutes=2), ts=T0 + timedelta(minutes=2, seconds=3),
                  expected_low=0.99, expected_high=1.0,
                  evidence={"n": 20.0, "count": 16.0, "confidence": 0.99, "p_value": 3.4e-05, "bound": 0.84})  # fmt: skip
    write(w, "alerts", [alert])
    yield s
    qs.stop()
    store.close()


class Dash:
    """`DashboardServer` on a free loopback port in a thread of its own."""

    def __init__(self, settings: Settings, token: str | None = None) -> None:
        self.server = DashboardServer(settings, token)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)

    def get(self, path: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> tuple[int, Any, dict[str, str]]:
        req = urllib.request.Request(self.url + path, headers=headers or {}, data=data)
        opener = urllib.request.build_opener(NoRedirect)
        try:
            with opener.open(req, timeout=60) as resp:
                body = resp.read()
                code, hdrs = resp.status, dict(resp.headers)
        except urllib.error.HTTPError as exc:
            body, code, hdrs = exc.read(), exc.code, dict(exc.headers)
        try:
            return code, json.loads(body), hdrs
        except ValueError:
            return code, body.decode(errors="replace"), hdrs

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@pytest.fixture
def dash(served: Served) -> Iterator[Dash]:
    d = Dash(served.settings)
    yield d
    d.close()


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


RANGE = f"from={iso(T0)}&to={iso(T0 + timedelta(minutes=5))}"
DAY = f"from={iso(T0 - timedelta(hours=10))}&to={iso(T0 + timedelta(hours=14))}"


def test_binds_loopback_by_default(served: Served) -> None:
    assert served.settings.dashboard.host == "127.0.0.1"
    d = Dash(served.settings)
    try:
        assert d.url.startswith("http://127.0.0.1:")
    finally:
        d.close()


def test_panels_answer_from_the_store(dash: Dash, served: Served) -> None:
    calls = served.calls
    code, s, _ = dash.get(f"/api/summary?{RANGE}")
    assert code == 200, s
    assert s["requests"] == N and s["errors"] == sum(1 for c in calls if c.error_type)
    assert s["tokens"] == sum(c.total_tokens or 0 for c in calls)
    assert s["cost_usd"] == pytest.approx(N * 0.001)

    # 5 minutes / 240 points -> 2 s buckets: from the raw calls
    code, ts, _ = dash.get(f"/api/timeseries?{RANGE}&by=model")
    assert code == 200, ts
    assert ts["source"] == "llm_calls" and ts["step_s"] == 2
    assert {x["name"] for x in ts["series"]} == set(MODELS)
    assert sum(sum(x["requests"]) for x in ts["series"]) == N

    # a day: 10-minute buckets, whole worker windows -> llm_aggregates, same totals per model
    code, agg, _ = dash.get(f"/api/timeseries?{DAY}&by=model")
    assert code == 200, agg
    assert agg["source"] == "llm_aggregates" and agg["step_s"] == 600
    per_model = {x["name"]: sum(x["requests"]) for x in agg["series"]}
    assert per_model == {m: sum(1 for c in calls if c.model == m) for m in MODELS}
    tokens = sum(sum(x["tokens"]) for x in agg["series"])
    assert tokens == sum(c.total_tokens or 0 for c in calls)

    # filters the worker has no dimension set for -> per-minute roll-up or raw calls; same answer
    code, cut, _ = dash.get(f"/api/timeseries?{DAY}&by=app&model=gpt-4o")
    assert code == 200, cut
    assert cut["source"] == "llm_calls_1m"
    want = {a: sum(1 for c in calls if c.model == "gpt-4o" and c.app == a) for a in APPS}
    assert {x["name"]: sum(x["requests"]) for x in cut["series"]} == want
    # a week: hourly buckets from the hourly roll-up
    week = f"from={iso(T0 - timedelta(days=6))}&to={iso(T0 + timedelta(days=1))}"
    code, wk, _ = dash.get(f"/api/timeseries?{week}&by=model")
    assert wk["source"] == "llm_calls_1h" and wk["step_s"] == 3600
    assert {x["name"]: sum(x["requests"]) for x in wk["series"]} == per_model
    assert sum(sum(x["cost_usd"]) for x in wk["series"]) == pytest.approx(N * 0.001)
    code, us, _ = dash.get(f"/api/timeseries?{DAY}&by=user&status=error")
    assert us["source"] == "llm_calls"
    assert sum(sum(x["requests"]) for x in us["series"]) == s["errors"]

    code, gpu, _ = dash.get(f"/api/gpu?{RANGE}")
    assert code == 200 and {g["name"] for g in gpu["series"]} == {"h1 gpu0", "h1 gpu1"}
    assert gpu["series"][0]["memory_used_gib"][0] == pytest.approx(8.0)

    code, al, _ = dash.get(f"/api/alerts?{RANGE}&fingerprint=" + alert_fingerprint("success_rate", {"model": "gpt-4o-mini"}))
    assert code == 200 and len(al["active"]) == 1 and al["focus"][0]["rule"] == "success_rate"
    a = al["active"][0]
    assert (a["value"], a["threshold"], a["dimensions"]) == (0.8, 0.95, {"model": "gpt-4o-mini"})
    assert a["link"].startswith("/?alert=") and a["link"].endswith("&model=gpt-4o-mini")
    # the evidence: the band, the numbers (migration 7's columns) and the notifier's words for them
    assert (a["expected_low"], a["expected_high"]) == (0.99, 1.0)
    assert a["evidence"] == {"n": 20.0, "count": 16.0, "confidence": 0.99, "p_value": 3.4e-05, "bound": 0.84}
    assert a["why"] == "16 of 20, p=3.4e-05, 99% bound 0.84"


def test_slo_error_budget_left_per_rule_and_dimension(dash: Dash, served: Served) -> None:
    """The shipped success_rate SLO (99% over 30 days, by model and by app): each model's and
    app's budget left is 1 - error rate / 1%, from the calls of the period up to the range's end."""
    code, slo, _ = dash.get(f"/api/slo?{RANGE}")
    assert code == 200, slo
    got = {(b["rule"], b["dimension"], b["group"]): b for b in slo["budgets"]}
    for dim, values in (("model", MODELS), ("app", APPS)):
        for v in values:
            mine = [c for c in served.calls if getattr(c, dim) == v]
            errors = sum(1 for c in mine if c.error_type)
            b = got.pop(("success_rate", dim, v))
            assert (b["requests"], b["errors"], b["objective"], b["period_days"]) == (len(mine), errors, 0.99, 30)
            assert b["remaining"] == pytest.approx(1 - (errors / len(mine)) / 0.01)
            assert b["remaining"] < 0  # ~10% errors against a 1% budget: overspent ten times
    assert got == {}
    # lowest first within a dimension; a range ending before the calls has none to judge
    models = [b["remaining"] for b in slo["budgets"] if b["dimension"] == "model"]
    assert models == sorted(models)
    code, before, _ = dash.get(f"/api/slo?from={iso(T0 - timedelta(hours=2))}&to={iso(T0)}")
    assert code == 200 and before["budgets"] == []


def test_alert_link_matches_the_notifier(served: Served) -> None:
    from llmpulse.analysis.panels import alert_link
    from llmpulse.sinks.notifier.blocks import dashboard_link

    dims = {"model": "gpt-4o-mini", "app": "a b"}
    a = Alert(fingerprint=alert_fingerprint("r", dims), rule="r", severity="warning", state="firing", metric="m",
              dimensions=dims, window_start=T0, window_end=T0 + timedelta(minutes=1), started_at=T0)  # fmt: skip
    ours = alert_link(a.fingerprint, iso(T0)[:-1] + ".000Z", iso(T0 + timedelta(minutes=1)), dims)
    assert dashboard_link("http://x", a) == "http://x" + ours


def test_call_log_filters_and_detail(dash: Dash, served: Served) -> None:
    code, page, _ = dash.get(f"/api/calls?{RANGE}&model=gpt-4o-mini&status=error&error_type=rate_limited&user=u1")
    assert code == 200, page
    want = [c for c in served.calls if c.model == "gpt-4o-mini" and c.error_type and c.user == "u1"]
    assert page["total"] == len(want) and len(page["rows"]) == min(100, len(want))
    i = page["columns"].index
    assert all(r[i("model")] == "gpt-4o-mini" and r[i("status_code")] == 429 and r[i("user")] == "u1" for r in page["rows"])
    code, page, _ = dash.get(f"/api/calls?{RANGE}&status=429")
    assert page["total"] == sum(1 for c in served.calls if c.status_code == 429)

    code, d, _ = dash.get("/api/calls/c00000")
    assert code == 200 and d["captured"] and d["prompt"] == "hello" and d["response"] == "hi"
    assert "prompt" not in d["fields"] and d["fields"]["model"] == "gpt-4o"
    code, d, _ = dash.get("/api/calls/c00001")
    assert code == 200 and not d["captured"] and d["prompt"] is None
    assert dash.get("/api/calls/nope")[0] == 404
    code, o, _ = dash.get(f"/api/options?{RANGE}")
    assert o["model"] == sorted(MODELS) and o["error_type"] == ["rate_limited"] and o["status_code"] == [200, 429]


def test_bad_input_is_a_clear_400(dash: Dash) -> None:
    for q, msg in (("from=yesterday", "bad time"), ("from=2025-03-05T00:00:00Z&to=2025-03-04T00:00:00Z", "empty"),
                   ("from=now-400d", "wider"), ("status=maybe", "status"),
                   ("by=colour", "by must be")):  # fmt: skip
        code, body, _ = dash.get(f"/api/timeseries?{q}")
        assert code == 400 and msg in body["error"], (q, body)


def test_query_endpoint_is_read_only_and_limited(dash: Dash, served: Served) -> None:
    for sql in ("INSERT INTO llmpulse.llm_calls (event_id) VALUES ('x')", "DROP TABLE llmpulse.llm_calls",
                "ALTER TABLE llmpulse.llm_calls DELETE WHERE 1"):  # fmt: skip
        code, body, _ = dash.get("/api/query", data=json.dumps({"sql": sql}).encode(), headers={"Content-Type": "application/json"})
        assert code == 403 and "read-only" in body["error"], body
    # only llmpulse's tables (every attack on every path: tests/test_query_guard.py)
    for sql, reason in (("SELECT * FROM file('/etc/passwd', 'LineAsString')", "table function file()"),
                        ("SELECT name FROM system.users", "table system.users is not readable")):  # fmt: skip
        code, body, _ = dash.get("/api/query", data=json.dumps({"sql": sql}).encode())
        assert code == 403 and reason in body["error"] and "root:" not in json.dumps(body), body
    code, body, _ = dash.get("/api/query?sql=SELECT+count()+FROM+llmpulse.llm_calls+FINAL")
    assert code == 200 and body["rows"] == [[N]]
    limit = served.settings.dashboard.query_max_rows
    code, body, _ = dash.get("/api/query", data=json.dumps({"sql": "SELECT arrayJoin(range(100000))"}).encode())
    assert code == 200 and body["truncated"] and len(body["rows"]) == limit and "cut at" in body["message"]
    code, body, _ = dash.get("/api/query", data=json.dumps({"sql": "SELECT 1", "max_rows": 10**9}).encode())
    assert code == 200 and body["max_rows"] == limit


def test_token_is_required_when_configured(served: Served) -> None:
    d = Dash(served.settings, token="s3cret")
    try:
        assert d.get("/healthz")[0] == 200
        for path in ("/api/summary", "/api/query?sql=SELECT+1", "/metrics"):
            code, body, _ = d.get(path)
            assert code == 401 and "bearer token" in body["error"]
            assert d.get(path, {"Authorization": "Bearer wrong"})[0] == 401
            assert d.get(path, {"Authorization": "Bearer s3cret"})[0] == 200
        code, page, _ = d.get("/")
        assert code == 401 and "token" in page
        # a browser opens /?token=...: a cookie, and a redirect that keeps the other parameters
        code, _, hdrs = d.get("/?token=s3cret&model=gpt-4o")
        assert code == 302 and hdrs["Location"] == "/?model=gpt-4o"
        cookie = hdrs["Set-Cookie"].split(";")[0]
        assert "HttpOnly" in hdrs["Set-Cookie"]
        assert d.get("/api/summary", {"Cookie": cookie})[0] == 200
        assert d.get("/?token=wrong")[0] == 401
    finally:
        d.close()


def test_page_and_chart_library(dash: Dash) -> None:
    code, html, _ = dash.get("/")
    assert code == 200 and "/static/plotly.min.js" in html and "data-panel=\"calls\"" in html
    req = urllib.request.urlopen(dash.url + "/static/plotly.min.js")
    js = req.read()
    assert len(js) > 1_000_000 and b"plotly" in js[:2000].lower()
    assert not list(Path(__file__).resolve().parent.parent.glob("llmpulse/**/plotly*.js"))  # never copied in
    assert dash.get("/static/../api.py")[0] == 404
