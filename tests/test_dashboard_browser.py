"""The dashboard end to end in headless Chromium, over demo data that went through the pipeline.

Demo traffic (the loadgen's schedule, with its error burst and a pinned GPU) goes to the
real broker; a real worker turns it into windows and alerts; a real sink writes it to chDB;
`llmpulse dashboard` serves it; Debian's Chromium, driven by Playwright, looks at it.
Screenshots land in test-artifacts/.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from llmpulse.config import Settings
from llmpulse.embedded.ports import free_port, port_open
from llmpulse.producers.loadgen import LoadGenerator, default_schedule
from llmpulse.schemas import CallEvent, encode
from tests.kafkatools import produce
from tests.pipeline import Component, settings_from, wait_for, write_config

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
PANELS = ["summary", "qps", "error_rate", "latency_p95", "ttft_p95", "tokens", "cost",
          "gpu_util", "gpu_memory", "gpu_temperature", "host_cpu", "host_memory", "host_load",
          "alerts", "slo", "calls"]  # fmt: skip
CHARTS = PANELS[1:13]
CAPTURED_PROMPT = "What is the capital of France? (captured)"


@pytest.fixture
def demo(make_settings: Callable[..., Settings], tmp_path: Path) -> Iterator[tuple[Settings, str]]:
    """A worker, a sink and the dashboard over ~4 minutes of demo traffic that ended a minute ago."""
    base = make_settings()
    port = free_port()
    config = write_config(
        tmp_path / "llmpulse.yaml", base,
        worker__windows_s=[10, 60], dashboard__port=port, gpu__interval_s=5.0,
    )  # fmt: skip
    settings = settings_from(config)
    comps = [
        Component(config, "sink", log=tmp_path / "sink.log").start(),
        Component(config, "worker", "--flush-on-exit", log=tmp_path / "worker.log").start(),
    ]
    try:
        start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=330)
        gen = LoadGenerator(settings, default_schedule(0.5), rate_per_s=6.0, realtime=False, rhythm=None,
                            bootstrap=settings.kafka.bootstrap_servers())  # fmt: skip
        stats = gen.run_fast(start=start, duration_s=270)
        # two calls recorded with capture on (prompt and response, as the SDK sends them)
        captured = [
            CallEvent(event_id=f"captured-{i}", ts=start + timedelta(seconds=200 + i), model="gpt-4o-mini",
                      app="support-bot", user="captured-user", status_code=200, latency_ms=420.0, ttft_ms=95.0,
                      prompt_tokens=12, completion_tokens=8, cost_usd=0.00001,
                      prompt=CAPTURED_PROMPT, response="Paris.")
            for i in range(2)
        ]
        produce(settings.kafka.bootstrap_servers(), settings.kafka.topic("calls"),
                [(e.model, encode(e)) for e in captured])  # fmt: skip
        n = stats.calls + len(captured)
        assert wait_for(settings, "SELECT count() FROM llmpulse.llm_calls FINAL", lambda r: r[0][0] >= n)[0][0] == n
        assert wait_for(settings, "SELECT count() FROM llmpulse.gpu_samples", lambda r: r[0][0] > 0)[0][0] > 0
        assert wait_for(settings, "SELECT count() FROM llmpulse.host_samples", lambda r: r[0][0] > 0)[0][0] > 0
        assert wait_for(settings, "SELECT count() FROM llmpulse.llm_aggregates WHERE window_s = 60 AND kind = 'calls'",
                        lambda r: r[0][0] > 0)[0][0] > 0  # fmt: skip
        assert wait_for(settings, "SELECT count() FROM llmpulse.alerts", lambda r: r[0][0] > 0)[0][0] > 0
        dash = Component(config, "dashboard", log=tmp_path / "dashboard.log").start()
        comps.append(dash)
        deadline = time.monotonic() + 30
        while not port_open(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert port_open(port), dash.output()
        yield settings, f"http://127.0.0.1:{port}"
    finally:
        for c in reversed(comps):
            c.stop()
    for c in comps:
        assert "Traceback" not in c.output(), c.output()[-3000:]


def _loaded(page: Any, before: int, timeout_ms: int = 30_000) -> int:
    page.wait_for_function(f"Number(document.body.dataset.loaded || 0) > {before}", timeout=timeout_ms)
    return int(page.evaluate("Number(document.body.dataset.loaded)"))


def _panel_states(page: Any) -> dict[str, str]:
    return dict(page.evaluate("Object.fromEntries([...document.querySelectorAll('[data-panel]')]"
                              ".map(e => [e.dataset.panel, e.dataset.state || '']))"))  # fmt: skip


@pytest.mark.e2e
def test_dashboard_in_chromium(demo: tuple[Settings, str]) -> None:
    from playwright.sync_api import sync_playwright

    _settings, url = demo
    ARTIFACTS.mkdir(exist_ok=True)
    # the API beside the page answers the same data
    with urllib.request.urlopen(f"{url}/api/summary?from=now-15m") as resp:
        summary = json.loads(resp.read())
    assert summary["requests"] > 500 and summary["errors"] > 0

    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 2300})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))

            # 1. every panel rendered with data
            page.goto(f"{url}/?range=15m&refresh=0")
            n = _loaded(page, 0)
            states = _panel_states(page)
            assert set(states) == set(PANELS)
            assert states == dict.fromkeys(PANELS, "ready"), states
            for name in CHARTS:  # the charts: plotly drew traces with points
                points = page.evaluate(
                    f"(document.querySelector('[data-panel={name}] .plot').data || [])"
                    ".reduce((n, t) => n + (t.y || []).filter(v => v !== null).length, 0)"
                )
                assert points > 0, name
                assert page.locator(f"[data-panel={name}] .plot svg.main-svg").count() > 0, name
            assert page.locator("[data-panel=alerts] tbody tr").count() > 0
            assert page.locator("[data-panel=calls] tbody tr").count() > 0
            assert page.locator("[data-panel=summary] .tile").count() == 7
            models = page.evaluate("document.querySelector('[data-panel=qps] .plot').data.map(t => t.name)")
            assert "gpt-4o-mini" in models
            page.screenshot(path=str(ARTIFACTS / "dashboard-overview.png"), full_page=True)

            # 2. a filter: one model, errors only
            page.select_option("#f-model", "gpt-4o-mini")
            page.select_option("#f-status", "error")
            page.click("#apply")
            n = _loaded(page, n)
            assert "model=gpt-4o-mini" in page.url and "status=error" in page.url
            cells = page.evaluate(
                "[...document.querySelectorAll('[data-panel=calls] tbody tr')].map(tr => "
                "[tr.children[2].textContent, Number(tr.children[5].textContent)])"
            )
            assert cells and all(m == "gpt-4o-mini" and code >= 400 for m, code in cells), cells[:5]
            assert page.evaluate("document.querySelector('[data-panel=qps] .plot').data.map(t => t.name)") == ["gpt-4o-mini"]
            page.screenshot(path=str(ARTIFACTS / "dashboard-filtered.png"), full_page=True)

            # 3. a call's details: a captured call shows its prompt, an ordinary one says capture was off
            page.click("[data-panel=calls] tbody tr.call-row")
            page.wait_for_selector("#call-detail[open]")
            assert page.locator("#detail-nocapture").is_visible()
            assert "gpt-4o-mini" in page.inner_text("#detail-body")
            page.click("#call-detail .close")
            page.goto(f"{url}/?range=15m&refresh=0&user=captured-user")
            n = _loaded(page, 0)
            assert page.locator("[data-panel=calls] tbody tr").count() == 2
            page.click("[data-panel=calls] tbody tr.call-row")
            page.wait_for_selector("#call-detail[open] #detail-prompt")
            assert page.inner_text("#detail-prompt") == CAPTURED_PROMPT
            assert page.inner_text("#detail-response") == "Paris."
            page.screenshot(path=str(ARTIFACTS / "dashboard-call-detail.png"))
            page.click("#call-detail .close")

            # 4. an alert's link opens its time range and dimensions
            page.goto(f"{url}/?range=15m&refresh=0")
            n = _loaded(page, 0)
            link = page.locator("[data-panel=alerts] a.alert-link").first
            href = link.get_attribute("href")
            assert href and href.startswith("/?alert=")
            link.click()
            n = _loaded(page, n)
            assert "alert=" in page.url and "from=" in page.url and "to=" in page.url
            focus = page.locator("#alert-focus")
            assert focus.is_visible() and "Alert" in focus.inner_text()
            target = dict(p.split("=", 1) for p in href[2:].split("&"))
            for dim in ("model", "app", "user"):
                if dim in target:
                    assert page.input_value(f"#f-{dim}") == target[dim].replace("%2F", "/")
            assert page.input_value("#range") == "custom"
            assert page.locator("[data-panel=alerts] tr.focus").count() >= 1 or focus.get_attribute("data-fingerprint")
            page.screenshot(path=str(ARTIFACTS / "dashboard-alert-link.png"), full_page=True)
        finally:
            browser.close()
    assert not problems, problems
