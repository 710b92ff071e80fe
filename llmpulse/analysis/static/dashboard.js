// llmpulse dashboard: reads the JSON API of this server and draws with plotly.js.
"use strict";

const FILTERS = ["model", "app", "user", "status", "error_type"];
const RANGES = { "5m": 300, "15m": 900, "1h": 3600, "6h": 21600, "24h": 86400, "7d": 604800 };
const $ = (sel) => document.querySelector(sel);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

const state = { params: new URLSearchParams(location.search), callsOffset: 0, timer: null, loading: false };

function fmt(v, digits = 3) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (typeof v !== "number") return esc(v);
  if (Math.abs(v) >= 1000) return v.toLocaleString("en-US", { maximumFractionDigits: 0 });
  return Number(v.toPrecision(digits)).toString();
}
const pct = (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(2) + "%");
const usd = (v) => (v === null || v === undefined ? "–" : "$" + Number(v).toFixed(v < 1 ? 4 : 2));

function toInput(d) { return d.toISOString().slice(0, 19); }
function fromInput(v) { return v ? v + "Z" : ""; }

// The time range and filters of the page, from the URL.
function currentQuery() {
  const p = state.params;
  const q = new URLSearchParams();
  if (p.get("from") || p.get("to")) {
    if (p.get("from")) q.set("from", p.get("from"));
    if (p.get("to")) q.set("to", p.get("to"));
  } else {
    const secs = RANGES[p.get("range") || "1h"] || 3600;
    const now = new Date();
    q.set("from", new Date(now.getTime() - secs * 1000).toISOString());
    q.set("to", now.toISOString());
  }
  for (const f of FILTERS) if (p.get(f)) q.set(f, p.get(f));
  return q;
}

function syncControls() {
  const p = state.params;
  const custom = p.get("from") || p.get("to");
  $("#range").value = custom ? "custom" : (p.get("range") || "1h");
  const q = currentQuery();
  $("#from").value = toInput(new Date(q.get("from")));
  $("#to").value = toInput(new Date(q.get("to")));
  $("#by").value = p.get("by") || "model";
  for (const f of FILTERS) {
    const sel = $("#f-" + f);
    const v = p.get(f) || "";
    if (v && ![...sel.options].some((o) => o.value === v)) sel.add(new Option(v, v));
    sel.value = v;
  }
  const refresh = p.get("refresh") ?? document.body.dataset.refreshDefault ?? "30";
  const r = $("#refresh");
  if (![...r.options].some((o) => o.value === String(Number(refresh)))) r.add(new Option(refresh + " s", String(Number(refresh))));
  r.value = String(Number(refresh));
}

function readControls() {
  const p = new URLSearchParams();
  const range = $("#range").value;
  if (range === "custom") {
    if ($("#from").value) p.set("from", fromInput($("#from").value));
    if ($("#to").value) p.set("to", fromInput($("#to").value));
  } else {
    p.set("range", range);
  }
  const by = $("#by").value;
  if (by !== "model") p.set("by", by);
  for (const f of FILTERS) if ($("#f-" + f).value) p.set(f, $("#f-" + f).value);
  p.set("refresh", $("#refresh").value);
  if (state.params.get("alert")) p.set("alert", state.params.get("alert"));
  return p;
}

async function api(path, query) {
  const url = path + (query ? "?" + query.toString() : "");
  const resp = await fetch(url, { credentials: "same-origin" });
  let body;
  try { body = await resp.json(); } catch (e) { body = { error: resp.statusText }; }
  if (!resp.ok) throw new Error(body.error || resp.statusText);
  return body;
}

function setPanel(name, st, message) {
  const el = document.querySelector(`[data-panel="${name}"]`);
  el.dataset.state = st;
  const box = el.querySelector(".plot, .table-wrap, .tiles");
  if (st === "empty" || st === "error") {
    if (box.classList.contains("plot") && window.Plotly) Plotly.purge(box);
    box.innerHTML = `<div class="${st === "error" ? "err" : "empty"}">${esc(message || "no data in this range")}</div>`;
  }
  return box;
}

const PLOT_CONFIG = { displayModeBar: false, responsive: true };
function layout(yTitle, yFormat) {
  return {
    margin: { l: 56, r: 10, t: 6, b: 30 }, height: 240, showlegend: true,
    legend: { orientation: "h", y: -0.18, font: { size: 10 } },
    xaxis: { type: "date" }, yaxis: { title: { text: yTitle, font: { size: 10 } }, tickformat: yFormat || "", rangemode: "tozero" },
    hovermode: "x unified", paper_bgcolor: "#fff", plot_bgcolor: "#fff",
  };
}

function drawChart(name, series, key, yTitle, yFormat, kind) {
  const traces = series.map((s) => ({
    x: s.t, y: s[key], name: s.name, type: kind === "bar" ? "bar" : "scatter",
    mode: "lines+markers", marker: { size: 3 }, connectgaps: false,
  }));
  const hasData = series.some((s) => s[key].some((v) => v !== null && v !== undefined));
  if (!hasData) { setPanel(name, "empty"); return; }
  const box = setPanel(name, "ready");
  if (box.querySelector(".empty, .err")) box.innerHTML = "";
  const lay = layout(yTitle, yFormat);
  if (kind === "bar") lay.barmode = "stack";
  Plotly.react(box, traces, lay, PLOT_CONFIG);
}

async function loadSummary(q) {
  const s = await api("/api/summary", q);
  const box = setPanel("summary", s.requests ? "ready" : "empty", "no calls in this range");
  if (!s.requests) return;
  const tiles = [
    ["requests", fmt(s.requests)], ["QPS", fmt(s.qps)], ["error rate", pct(s.error_rate)],
    ["latency p95", fmt(s.latency_p95_ms) + " ms"], ["TTFT p95", fmt(s.ttft_p95_ms) + " ms"],
    ["tokens", fmt(s.tokens)], ["cost", usd(s.cost_usd)],
  ];
  box.innerHTML = tiles.map(([k, v]) => `<div class="tile"><div class="v">${v}</div><div class="k">${k}</div></div>`).join("");
}

async function loadTimeseries(q) {
  const tq = new URLSearchParams(q);
  tq.set("by", state.params.get("by") || "model");
  const ts = await api("/api/timeseries", tq);
  const s = ts.series;
  drawChart("qps", s, "qps", "req/s");
  drawChart("error_rate", s, "error_rate", "share", ".1%");
  drawChart("latency_p95", s, "latency_p95_ms", "ms");
  drawChart("ttft_p95", s, "ttft_p95_ms", "ms");
  drawChart("tokens", s, "tokens", "tokens / " + ts.step_s + " s", "", "bar");
  drawChart("cost", s, "cost_usd", "USD / " + ts.step_s + " s", "", "bar");
}

async function loadGpu(q) {
  const g = await api("/api/gpu", q);
  drawChart("gpu_util", g.series, "utilization_pct", "%");
  drawChart("gpu_memory", g.series, "memory_used_gib", "GiB");
  drawChart("gpu_temperature", g.series, "temperature_c", "°C");
}

async function loadHost(q) {
  const h = await api("/api/host", q);
  drawChart("host_cpu", h.series, "cpu_pct", "%");
  drawChart("host_memory", h.series, "memory_used_pct", "%");
  drawChart("host_load", h.series, "load1", "load (1 min)");
}

// the band a healthy value lies in (one side may be open), as the notifier words it
function band(a) {
  if (a.expected_low === null && a.expected_high === null) return "";
  return `expected ${a.expected_low === null ? "" : fmt(a.expected_low)}..${a.expected_high === null ? "" : fmt(a.expected_high)}`;
}

function alertRow(a, focus) {
  const dims = Object.entries(a.dimensions).map(([k, v]) => `${esc(k)}=${esc(v)}`).join(", ") || "all traffic";
  const vs = [a.threshold !== null ? "threshold " + fmt(a.threshold) : "", a.baseline !== null ? "baseline " + fmt(a.baseline) : "", band(a)].filter(Boolean).join(", ");
  const st = a.state === "resolved" ? '<span class="state-resolved">resolved</span>' : (a.active ? "<b>firing</b>" : "firing");
  return `<tr class="${focus ? "focus" : ""}" data-fingerprint="${esc(a.fingerprint)}">
    <td class="sev-${esc(a.severity)}">${esc(a.severity)}</td><td>${st}</td>
    <td><a class="alert-link" href="${esc(a.link)}">${esc(a.rule)}</a></td><td>${dims}</td>
    <td>${esc(a.metric)}</td><td class="num">${fmt(a.value)}</td><td>${esc(vs)}</td>
    <td class="evidence" title="${esc(JSON.stringify(a.evidence || {}))}">${esc(a.why || "")}</td>
    <td>${esc(a.window_start.slice(0, 19).replace("T", " "))} – ${esc(a.window_end.slice(11, 19))}</td>
    <td>${esc(a.ts.slice(0, 19).replace("T", " "))}</td><td>${esc(a.summary)}</td>
    <td class="actions">${(a.actions || []).map((x) => `<span class="action action-${esc(x.status)}" title="${esc(x.action_id)}">` +
      `${esc(x.kind)} ${esc(Object.entries(x.target).map(([k, v]) => k + "=" + v).join(", "))}: <b>${esc(x.status)}</b>` +
      (x.status === "pending" ? ` (llmpulse actions approve ${esc(x.action_id.slice(0, 12))})` : ` by ${esc(x.actor)}`) + `</span>`).join("<br>")}</td></tr>`;
}

async function loadAlerts(q) {
  const aq = new URLSearchParams(q);
  const fp = state.params.get("alert");
  if (fp) aq.set("fingerprint", fp);
  const a = await api("/api/alerts", aq);
  const seen = new Set();
  const rows = [];
  for (const r of [...(a.focus || []).slice(0, 1), ...a.active, ...a.recent]) {
    if (seen.has(r.alert_id)) continue;
    seen.add(r.alert_id);
    rows.push(r);
  }
  const focus = $("#alert-focus");
  if (fp && a.focus && a.focus.length) {
    const f = a.focus[0];
    focus.hidden = false;
    focus.innerHTML = `Alert <b>${esc(f.rule)}</b> (${esc(f.severity)}, ${esc(f.state)}): ${esc(f.metric)} ${fmt(f.value)}` +
      (f.threshold !== null ? ` vs threshold ${fmt(f.threshold)}` : "") + (f.baseline !== null ? ` vs baseline ${fmt(f.baseline)}` : "") +
      (band(f) ? ` (${band(f)})` : "") + (f.why ? ` · evidence: ${esc(f.why)}` : "") +
      ` · window ${esc(f.window_start)} – ${esc(f.window_end)} · ${esc(f.summary)}`;
    focus.dataset.fingerprint = fp;
  } else if (fp) {
    focus.hidden = false;
    focus.textContent = `Alert ${fp}: not found in the alerts table`;
  } else {
    focus.hidden = true;
  }
  if (!rows.length) { setPanel("alerts", "empty", "no alerts in this range"); return; }
  const box = setPanel("alerts", "ready");
  box.innerHTML = `<table><thead><tr><th>severity</th><th>state</th><th>rule</th><th>dimensions</th><th>metric</th>
    <th>value</th><th>against</th><th>evidence</th><th>window (UTC)</th><th>at</th><th>summary</th><th>actions</th></tr></thead>
    <tbody>${rows.map((r) => alertRow(r, r.fingerprint === fp)).join("")}</tbody></table>`;
}

async function loadSlo(q) {
  const s = await api("/api/slo", q);
  if (!s.budgets.length) {
    setPanel("slo", "empty", s.skipped.length ? `SLOs by several dimensions are not shown (${s.skipped.join("; ")})` : "no SLO rules, or no calls in their periods");
    return;
  }
  const box = setPanel("slo", "ready");
  const row = (b) => {
    const left = b.remaining;
    const cls = left < 0 ? "sev-critical" : left < 0.25 ? "sev-warning" : "";
    return `<tr><td>${esc(b.rule)}</td><td>${esc((b.objective * 100).toPrecision(4).replace(/\.?0+$/, ""))}% over ${b.period_days}d</td>
      <td>${b.dimension ? esc(b.dimension) + "=" + esc(b.group) : "all traffic"}</td>
      <td class="num">${fmt(b.requests)}</td><td class="num">${fmt(b.errors)}</td>
      <td class="num ${cls}" data-remaining="${left}">${(left * 100).toFixed(0)}%</td></tr>`;
  };
  box.innerHTML = `<table><thead><tr><th>rule</th><th>objective</th><th>where</th><th>calls</th><th>errors</th>
    <th>error budget left</th></tr></thead><tbody>${s.budgets.map(row).join("")}</tbody></table>`;
}

async function loadCalls(q) {
  const cq = new URLSearchParams(q);
  cq.set("offset", state.callsOffset);
  const page = await api("/api/calls", cq);
  $("#calls-count").textContent = page.total ? `${state.callsOffset + 1}–${state.callsOffset + page.rows.length} of ${page.total.toLocaleString()} (newest first; click a row for details)` : "";
  $("#calls-prev").disabled = state.callsOffset === 0;
  $("#calls-next").disabled = state.callsOffset + page.rows.length >= page.total;
  if (!page.rows.length) { setPanel("calls", "empty", "no calls match"); return; }
  const box = setPanel("calls", "ready");
  const idx = Object.fromEntries(page.columns.map((c, i) => [c, i]));
  const num = new Set(["status_code", "latency_ms", "ttft_ms", "total_tokens", "cost_usd"]);
  const head = page.columns.map((c) => `<th>${esc(c)}</th>`).join("");
  const body = page.rows.map((r) => {
    const err = r[idx.status_code] >= 400 || r[idx.error_type];
    const cells = page.columns.map((c, i) => {
      let v = r[i];
      if (c === "ts") v = String(v).slice(0, 23).replace("T", " ");
      else if (c === "cost_usd") v = v === null ? "–" : Number(v).toFixed(6);
      else if (c === "latency_ms" || c === "ttft_ms") v = v === null ? "–" : Number(v).toFixed(1);
      return `<td class="${num.has(c) ? "num" : ""}">${esc(v)}</td>`;
    }).join("");
    return `<tr class="call-row${err ? " error" : ""}" data-event-id="${esc(r[idx.event_id])}">${cells}</tr>`;
  }).join("");
  box.innerHTML = `<table><thead><tr>${head}</tr></thead><tbody>${body}</tbody></table>`;
}

async function openCall(eventId) {
  const d = await api("/api/calls/" + encodeURIComponent(eventId));
  $("#detail-id").textContent = eventId;
  const rows = Object.entries(d.fields).map(([k, v]) => `<tr><td>${esc(k)}</td><td>${esc(v === null ? "–" : v)}</td></tr>`).join("");
  const text = d.captured
    ? `<h3>Prompt</h3><pre id="detail-prompt">${esc(d.prompt ?? "")}</pre><h3>Response</h3><pre id="detail-response">${esc(d.response ?? "")}</pre>`
    : `<p id="detail-nocapture"><i>Prompt and response were not captured (capture is off).</i></p>`;
  $("#detail-body").innerHTML = `<table>${rows}</table>${text}`;
  $("#call-detail").showModal();
}

async function loadOptions(q) {
  const o = await api("/api/options", q);
  for (const f of ["model", "app", "user", "error_type"]) {
    const sel = $("#f-" + f);
    const cur = state.params.get(f) || "";
    const values = new Set(o[f]);
    if (cur) values.add(cur);
    sel.innerHTML = '<option value="">all</option>' + [...values].sort().map((v) => `<option>${esc(v)}</option>`).join("");
    sel.value = cur;
  }
  const st = $("#f-status");
  const cur = state.params.get("status") || "";
  st.innerHTML = '<option value="">all</option><option value="ok">ok</option><option value="error">error</option>' +
    o.status_code.map((c) => `<option value="${c}">${c}</option>`).join("");
  if (cur && ![...st.options].some((x) => x.value === cur)) st.add(new Option(cur, cur));
  st.value = cur;
}

async function refresh() {
  if (state.loading) return;
  state.loading = true;
  const q = currentQuery();
  const line = $("#status-line");
  line.classList.remove("error");
  line.textContent = "loading…";
  const jobs = {
    summary: loadSummary(q), timeseries: loadTimeseries(q), gpu: loadGpu(q), host: loadHost(q),
    alerts: loadAlerts(q), slo: loadSlo(q), calls: loadCalls(q), options: loadOptions(q),
  };
  const panelsOf = {
    summary: ["summary"], timeseries: ["qps", "error_rate", "latency_p95", "ttft_p95", "tokens", "cost"],
    gpu: ["gpu_util", "gpu_memory", "gpu_temperature"], host: ["host_cpu", "host_memory", "host_load"], alerts: ["alerts"], slo: ["slo"], calls: ["calls"], options: [],
  };
  const errors = [];
  await Promise.all(Object.entries(jobs).map(([name, p]) => p.catch((e) => {
    errors.push(`${name}: ${e.message}`);
    for (const panel of panelsOf[name]) setPanel(panel, "error", e.message);
  })));
  state.loading = false;
  document.body.dataset.loaded = String(Number(document.body.dataset.loaded || 0) + 1);
  if (errors.length) { line.classList.add("error"); line.textContent = errors.join(" · "); }
  else line.textContent = `${q.get("from").slice(0, 19)}Z – ${q.get("to").slice(0, 19)}Z · updated ${new Date().toISOString().slice(11, 19)}Z`;
}

function schedule() {
  clearInterval(state.timer);
  const secs = Number($("#refresh").value);
  if (secs > 0) state.timer = setInterval(refresh, secs * 1000);
}

function navigate(params) {
  state.params = params;
  state.callsOffset = 0;
  history.pushState(null, "", "/?" + params.toString());
  syncControls();
  schedule();
  refresh();
}

function init() {
  syncControls();
  $("#controls").addEventListener("submit", (ev) => { ev.preventDefault(); navigate(readControls()); });
  $("#range").addEventListener("change", () => { if ($("#range").value !== "custom") navigate(readControls()); });
  $("#clear").addEventListener("click", () => {
    const p = new URLSearchParams();
    p.set("range", $("#range").value === "custom" ? "1h" : $("#range").value);
    p.set("refresh", $("#refresh").value);
    navigate(p);
  });
  $("#refresh").addEventListener("change", () => { state.params.set("refresh", $("#refresh").value); history.replaceState(null, "", "/?" + state.params); schedule(); });
  $("#calls-prev").addEventListener("click", () => { state.callsOffset = Math.max(0, state.callsOffset - 100); loadCalls(currentQuery()); });
  $("#calls-next").addEventListener("click", () => { state.callsOffset += 100; loadCalls(currentQuery()); });
  document.querySelector('[data-panel="calls"]').addEventListener("click", (ev) => {
    const tr = ev.target.closest("tr.call-row");
    if (tr) openCall(tr.dataset.eventId).catch((e) => { $("#status-line").textContent = "call: " + e.message; });
  });
  document.querySelector('[data-panel="alerts"]').addEventListener("click", (ev) => {
    const a = ev.target.closest("a.alert-link");
    if (!a) return;
    ev.preventDefault();
    const p = new URL(a.href).searchParams;
    p.set("refresh", "0");
    navigate(p);
  });
  window.addEventListener("popstate", () => { state.params = new URLSearchParams(location.search); syncControls(); refresh(); });
  schedule();
  refresh();
}

init();
