"""The dashboard page served at ``/`` by the health service.

One self-contained page: inline CSS and vanilla JavaScript, no external assets
(it works offline and under a ``default-src 'none'`` content security policy).
It polls ``/status`` every 1.5 s and redraws: readiness, ingress and delivery
rates, per-target throughput, lag (with a sparkline of the last minute), success
rate, circuit state and dead letters, the services seen through heartbeats, and
the latest failed attempts. Every value goes in through ``textContent``, never
as HTML: error texts come from receivers and must not become markup.
"""

# The page is HTML, CSS and JavaScript in one string: wrapping it at 100 columns hurts it.
# ruff: noqa: E501

from __future__ import annotations

POLL_MS = 1500

DASHBOARD_HTML = (
    """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mesh dashboard</title>
<style>
  :root {
    --bg: #0f1419; --panel: #171e26; --line: #263140; --text: #e6edf3; --muted: #8b98a8;
    --ok: #3fb950; --warn: #d29922; --bad: #f85149; --accent: #58a6ff; --idle: #6e7681;
  }
  * { box-sizing: border-box; }
  body {
    margin: 0; background: var(--bg); color: var(--text);
    font: 14px/1.45 system-ui, "DejaVu Sans", "Liberation Sans", Arial, sans-serif;
  }
  header {
    display: flex; align-items: center; gap: 16px; padding: 12px 24px;
    border-bottom: 1px solid var(--line); background: var(--panel);
  }
  header h1 { font-size: 18px; margin: 0; letter-spacing: .5px; }
  header h1 span { color: var(--accent); }
  header .meta { color: var(--muted); font-size: 13px; }
  header .spacer { flex: 1; }
  main { padding: 18px 24px 32px; max-width: 1400px; margin: 0 auto; }
  .cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 12px; }
  .card {
    background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px;
  }
  .card .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .6px; }
  .card .value { font-size: 24px; font-weight: 600; margin-top: 2px; font-variant-numeric: tabular-nums; }
  .card .sub { color: var(--muted); font-size: 12px; min-height: 16px; }
  section { margin-top: 22px; }
  section h2 {
    font-size: 13px; margin: 0 0 8px; color: var(--muted); text-transform: uppercase; letter-spacing: .8px;
  }
  table {
    width: 100%; border-collapse: collapse; background: var(--panel);
    border: 1px solid var(--line); border-radius: 8px; overflow: hidden;
  }
  th, td { text-align: left; padding: 7px 12px; border-bottom: 1px solid var(--line); vertical-align: middle; }
  th { color: var(--muted); font-weight: 500; font-size: 12px; background: #131a21; }
  tr:last-child td { border-bottom: none; }
  td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
  td.mono { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12px; }
  td.error { color: #ffb4ae; max-width: 460px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
  td.empty { color: var(--muted); text-align: center; padding: 14px; }
  .badge {
    display: inline-block; padding: 1px 9px; border-radius: 10px; font-size: 12px; font-weight: 600;
    border: 1px solid currentColor;
  }
  .ok { color: var(--ok); } .warn { color: var(--warn); } .bad { color: var(--bad); }
  .idle { color: var(--idle); }
  .pill { padding: 3px 10px; border-radius: 12px; font-size: 12px; font-weight: 600; }
  .pill.ok { background: rgba(63,185,80,.15); } .pill.bad { background: rgba(248,81,73,.15); }
  .pill.warn { background: rgba(210,153,34,.15); }
  .bar { display: inline-block; width: 64px; height: 6px; background: var(--line); border-radius: 3px;
    margin-left: 8px; vertical-align: middle; overflow: hidden; }
  .bar > i { display: block; height: 100%; background: var(--ok); }
  svg.spark { vertical-align: middle; display: block; }
  .notice { margin-top: 12px; padding: 8px 12px; border-radius: 6px; border: 1px solid var(--warn);
    color: var(--warn); background: rgba(210,153,34,.08); display: none; }
</style>
</head>
<body>
<header>
  <h1><span>mesh</span> dashboard</h1>
  <span id="conn" class="pill warn">connecting</span>
  <span class="meta" id="broker">broker: &ndash;</span>
  <span class="spacer"></span>
  <span class="meta">updated <span id="updated">never</span></span>
</header>
<main>
  <div class="cards">
    <div class="card"><div class="label">Ready</div><div class="value" id="ready">&ndash;</div>
      <div class="sub" id="ready-sub"></div></div>
    <div class="card"><div class="label">Events in</div><div class="value" id="events-rate">&ndash;</div>
      <div class="sub">per second</div></div>
    <div class="card"><div class="label">Delivered</div><div class="value" id="delivered-rate">&ndash;</div>
      <div class="sub">per second, last 10 s</div></div>
    <div class="card"><div class="label">Success rate</div><div class="value" id="success-rate">&ndash;</div>
      <div class="sub" id="success-sub">last 5 min</div></div>
    <div class="card"><div class="label">Total lag</div><div class="value" id="total-lag">&ndash;</div>
      <div class="sub">pending + unacked</div></div>
    <div class="card"><div class="label">Dead letters</div><div class="value" id="dlq-total">&ndash;</div>
      <div class="sub">retained</div></div>
    <div class="card"><div class="label">Open circuits</div><div class="value" id="open-circuits">&ndash;</div>
      <div class="sub">targets</div></div>
    <div class="card"><div class="label">Services</div><div class="value" id="services-up">&ndash;</div>
      <div class="sub" id="services-sub"></div></div>
    <div class="card"><div class="label">Database</div><div class="value" id="db">&ndash;</div>
      <div class="sub" id="db-sub"></div></div>
    <div class="card"><div class="label">Encryption key</div><div class="value" id="key-age">&ndash;</div>
      <div class="sub" id="key-sub"></div></div>
  </div>
  <div class="notice" id="notice"></div>

  <section>
    <h2>Targets</h2>
    <table id="targets">
      <thead><tr>
        <th>Target</th><th>Kind</th><th>Circuit</th><th class="num">Throughput /s</th>
        <th class="num">Lag</th><th>Lag trend</th><th class="num">Success (5 min)</th>
        <th class="num">Delivered</th><th class="num">Failed</th><th class="num">DLQ</th>
      </tr></thead>
      <tbody><tr><td class="empty" colspan="10">waiting for data</td></tr></tbody>
    </table>
  </section>

  <section>
    <h2>Recent failures</h2>
    <table id="failures">
      <thead><tr>
        <th>Time</th><th>Target</th><th>Event</th><th class="num">Attempt</th><th>Outcome</th>
        <th class="num">Status</th><th>Error</th>
      </tr></thead>
      <tbody><tr><td class="empty" colspan="7">none</td></tr></tbody>
    </table>
  </section>

  <section>
    <h2>Recent skips</h2>
    <table id="skips">
      <thead><tr><th>Time</th><th>Target</th><th>Event</th><th>Reason</th></tr></thead>
      <tbody><tr><td class="empty" colspan="4">none</td></tr></tbody>
    </table>
  </section>

  <section>
    <h2>Services</h2>
    <table id="services">
      <thead><tr>
        <th>Service</th><th>Instance</th><th>State</th><th class="num">Last heartbeat</th><th>Started</th>
      </tr></thead>
      <tbody><tr><td class="empty" colspan="5">none seen yet</td></tr></tbody>
    </table>
  </section>
</main>
<script>
"use strict";
const POLL_MS = """
    + str(POLL_MS)
    + """;
const HISTORY = 60;

function $(id) { return document.getElementById(id); }
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function fmtNum(v, digits) {
  if (v === null || v === undefined) return "\\u2013";
  return Number(v).toLocaleString("en-US", {maximumFractionDigits: digits || 0,
                                            minimumFractionDigits: digits || 0});
}
function fmtRate(v) { return v === null || v === undefined ? "\\u2013" : fmtNum(v, 1); }
function fmtPct(v) { return v === null || v === undefined ? "\\u2013" : (v * 100).toFixed(1) + " %"; }
function fmtTime(iso) {
  if (!iso) return "\\u2013";
  const d = new Date(iso);
  return isNaN(d) ? String(iso) : d.toLocaleTimeString("en-GB", {hour12: false});
}
function fmtAge(s) {
  if (s === null || s === undefined) return "\\u2013";
  if (s < 60) return s.toFixed(1) + " s ago";
  if (s < 3600) return Math.floor(s / 60) + " min ago";
  return Math.floor(s / 3600) + " h ago";
}
function setText(id, text, cls) {
  const e = $(id);
  e.textContent = text;
  if (cls !== undefined) e.className = "value " + cls;
}
function badge(text, cls) { return el("span", "badge " + cls, text); }
function circuitClass(c) { return c === "open" ? "bad" : c === "half_open" ? "warn" : c === "closed" ? "ok" : "idle"; }
function stateClass(s) { return s === "up" ? "ok" : s === "stale" ? "bad" : "idle"; }
function successClass(r) { return r === null || r === undefined ? "" : r >= 0.99 ? "ok" : r >= 0.9 ? "warn" : "bad"; }

function sparkline(values) {
  const ns = "http://www.w3.org/2000/svg";
  const w = 120, h = 22;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", w); svg.setAttribute("height", h);
  svg.setAttribute("viewBox", "0 0 " + w + " " + h);
  const bg = document.createElementNS(ns, "rect");
  bg.setAttribute("width", w); bg.setAttribute("height", h); bg.setAttribute("rx", "3");
  bg.setAttribute("fill", "#0f1419");
  svg.appendChild(bg);
  if (values.length < 2) return svg;
  const max = Math.max(1, ...values);
  const step = w / (HISTORY - 1);
  const x0 = w - step * (values.length - 1);
  const pts = values.map((v, i) => (x0 + i * step).toFixed(1) + "," + (h - 2 - (v / max) * (h - 4)).toFixed(1));
  const color = values[values.length - 1] > 0 ? "#d29922" : "#58a6ff";
  const area = document.createElementNS(ns, "polygon");
  area.setAttribute("points", x0.toFixed(1) + "," + h + " " + pts.join(" ") + " " + w + "," + h);
  area.setAttribute("fill", color);
  area.setAttribute("fill-opacity", "0.18");
  svg.appendChild(area);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", pts.join(" "));
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", color);
  line.setAttribute("stroke-width", "1.5");
  svg.appendChild(line);
  return svg;
}

function replaceRows(tbody, rows, colspan, emptyText) {
  while (tbody.firstChild) tbody.removeChild(tbody.firstChild);
  if (!rows.length) {
    const tr = el("tr");
    const td = el("td", "empty", emptyText);
    td.colSpan = colspan;
    tr.appendChild(td);
    tbody.appendChild(tr);
    return;
  }
  rows.forEach(r => tbody.appendChild(r));
}

function renderTargets(targets) {
  const rows = targets.map(t => {
    // The server keeps the last minute of samples, one a second: a fresh page has a trend.
    const hist = (t.lag_history || []).slice(-HISTORY);
    const tr = el("tr");
    tr.dataset.target = t.name;
    tr.appendChild(el("td", "name", t.name));
    tr.appendChild(el("td", "kind idle", t.kind));
    const c = el("td", "circuit");
    c.appendChild(t.circuit ? badge(t.circuit.replace("_", "-"), circuitClass(t.circuit)) : el("span", "idle", "\\u2013"));
    if (t.paused) c.appendChild(el("span", "idle", " paused"));
    tr.appendChild(c);
    tr.appendChild(el("td", "num rate", fmtRate(t.delivered_per_s)));
    tr.appendChild(el("td", "num lag " + (t.lag > 0 ? "warn" : ""), fmtNum(t.lag)));
    const trend = el("td", "trend");
    trend.appendChild(sparkline(hist));
    tr.appendChild(trend);
    const s = el("td", "num success " + successClass(t.success_rate), fmtPct(t.success_rate));
    if (t.success_rate !== null && t.success_rate !== undefined) {
      const bar = el("span", "bar"); const fill = el("i");
      fill.style.width = Math.round(t.success_rate * 100) + "%";
      if (t.success_rate < 0.9) fill.style.background = "var(--bad)";
      else if (t.success_rate < 0.99) fill.style.background = "var(--warn)";
      bar.appendChild(fill); s.appendChild(bar);
    }
    tr.appendChild(s);
    tr.appendChild(el("td", "num delivered", fmtNum(t.delivered)));
    tr.appendChild(el("td", "num failed " + (t.failed > 0 ? "bad" : ""), fmtNum(t.failed)));
    tr.appendChild(el("td", "num dlq " + (t.dlq > 0 ? "bad" : ""), fmtNum(t.dlq)));
    return tr;
  });
  replaceRows($("targets").tBodies[0], rows, 10, "no targets registered");
}

function renderServices(services) {
  const rows = services.map(s => {
    const tr = el("tr");
    tr.dataset.service = s.service;
    tr.dataset.instance = s.instance;
    tr.appendChild(el("td", "service", s.service));
    tr.appendChild(el("td", "mono instance", s.instance));
    const st = el("td", "state");
    st.appendChild(badge(s.state, stateClass(s.state)));
    if (s.status && s.status !== "ok" && s.status !== s.state) st.appendChild(el("span", "idle", " " + s.status));
    tr.appendChild(st);
    tr.appendChild(el("td", "num age", fmtAge(s.age_s)));
    tr.appendChild(el("td", "started idle", fmtTime(s.started_at)));
    return tr;
  });
  replaceRows($("services").tBodies[0], rows, 5, "none seen yet");
}

function renderSkips(skips) {
  const rows = (skips || []).map(f => {
    const tr = el("tr");
    tr.dataset.target = f.target;
    tr.appendChild(el("td", "at", fmtTime(f.at)));
    tr.appendChild(el("td", "target", f.target));
    tr.appendChild(el("td", "mono event", f.event_id));
    const r = el("td", "error reason", f.reason || "");
    r.title = f.reason || "";
    tr.appendChild(r);
    return tr;
  });
  replaceRows($("skips").tBodies[0], rows, 4, "none");
}

function renderFailures(failures) {
  const rows = failures.map(f => {
    const tr = el("tr");
    tr.dataset.target = f.target;
    tr.appendChild(el("td", "at", fmtTime(f.at)));
    tr.appendChild(el("td", "target", f.target));
    tr.appendChild(el("td", "mono event", f.event_id));
    tr.appendChild(el("td", "num attempt", f.attempt));
    tr.appendChild(el("td", "outcome " + (f.outcome === "dead" ? "bad" : "warn"), f.outcome));
    tr.appendChild(el("td", "num status", f.status_code === null ? "\\u2013" : f.status_code));
    const e = el("td", "error", f.error || "");
    e.title = f.error || "";
    tr.appendChild(e);
    return tr;
  });
  replaceRows($("failures").tBodies[0], rows, 7, "none");
}

function render(s) {
  const ready = s.ready || {};
  setText("ready", ready.ok ? "ready" : "not ready", ready.ok ? "ok" : "bad");
  const down = ["nats", "jetstream", "database"].filter(k => ready[k] === false);
  $("ready-sub").textContent = down.length ? "down: " + down.join(", ") : "NATS, JetStream, database";
  setText("events-rate", fmtRate(s.events_per_s));
  setText("delivered-rate", fmtRate(s.deliveries.delivered_per_s));
  setText("success-rate", fmtPct(s.deliveries.success_rate), successClass(s.deliveries.success_rate));
  $("success-sub").textContent = "last 5 min, " + fmtNum(s.deliveries.attempts) + " attempts";
  setText("total-lag", fmtNum(s.totals.lag), s.totals.lag > 0 ? "warn" : "");
  setText("dlq-total", fmtNum(s.totals.dlq), s.totals.dlq > 0 ? "bad" : "");
  setText("open-circuits", fmtNum(s.totals.open_circuits), s.totals.open_circuits > 0 ? "bad" : "ok");
  const up = s.services.filter(x => x.state === "up").length;
  setText("services-up", up + " up", s.totals.stale_services > 0 ? "warn" : "ok");
  $("services-sub").textContent = s.totals.stale_services + " stale";
  const db = s.database || {};
  setText("db", db.ok ? "ok" : "down", db.ok ? "ok" : "bad");
  $("db-sub").textContent = db.ok ? (db.backend || "") : (db.error || "");
  $("db-sub").title = db.error || "";
  const k = s.keys || {};
  if (k.ok) {
    setText("key-age", fmtNum(k.age_days, 1) + " d", k.warning ? "warn" : "ok");
    $("key-sub").textContent = k.warning ? "rotate: over " + k.rotation_days + " d" : "rotate every " + k.rotation_days + " d";
  } else {
    setText("key-age", "missing", "bad");
    $("key-sub").textContent = k.error || "";
  }
  const notes = [];
  if (k.warning) notes.push(k.warning);
  if (s.refresh_error) notes.push("JetStream: " + s.refresh_error);
  const n = $("notice");
  n.textContent = notes.join(" \\u00b7 ");
  n.style.display = notes.length ? "block" : "none";
  const b = s.broker || {};
  $("broker").textContent = "broker: " + (b.url || "\\u2013") + (b.server_version ? " (nats-server " + b.server_version + ")" : "") + (b.connected ? "" : " \\u2013 disconnected");
  renderTargets(s.targets);
  renderFailures(s.recent_failures);
  renderSkips(s.recent_skips);
  renderServices(s.services);
  $("updated").textContent = fmtTime(s.generated_at);
}

let failures = 0;
async function poll() {
  try {
    const r = await fetch("status", {cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
    failures = 0;
    const c = $("conn"); c.textContent = "live"; c.className = "pill ok";
  } catch (e) {
    failures += 1;
    const c = $("conn");
    c.textContent = failures > 2 ? "offline" : "retrying";
    c.className = "pill " + (failures > 2 ? "bad" : "warn");
  } finally {
    setTimeout(poll, POLL_MS);
  }
}
poll();
</script>
</body>
</html>
"""
)
