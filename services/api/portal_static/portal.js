// The endpoint-owner portal: every action is a call to the mesh's HTTP API (/v1) with
// the session credential the server put in <meta name=mesh-session>. Values are
// written as text (textContent), never parsed as markup.
"use strict";

(function () {
  const meta = (name) => document.querySelector(`meta[name="${name}"]`).content;
  const session = meta("mesh-session");
  const tenant = meta("mesh-tenant");
  const TEST_SOURCE = "portal-test";
  const $ = (id) => document.getElementById(id);

  // The link is a credential: keep it out of the history and the address bar.
  history.replaceState(null, "", location.pathname);

  async function api(method, path, body) {
    const init = { method, headers: { Authorization: `Bearer ${session}` } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const resp = await fetch(path, init);
    const text = await resp.text();
    const doc = text ? JSON.parse(text) : null;
    if (!resp.ok) {
      let why = (doc && (doc.detail || doc.title)) || resp.statusText;
      for (const e of (doc && doc.errors) || []) why += `; ${e.loc.slice(1).join(".")}: ${e.msg}`;
      throw new Error(`${method} ${path}: ${resp.status} ${why}`);
    }
    return doc;
  }

  function show(id, message) {
    const el = $(id);
    el.textContent = message;
    el.hidden = !message;
  }

  async function act(what, fn) {
    show("error", "");
    try {
      await fn();
      if (what) show("notice", what);
      await refresh();
    } catch (err) {
      show("notice", "");
      show("error", err.message);
    }
  }

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    Object.assign(node, props || {});
    for (const c of children) node.append(c instanceof Node ? c : String(c ?? ""));
    return node;
  }

  function button(label, cls, onclick) {
    return el("button", { type: "button", className: cls, textContent: label, onclick });
  }

  function fill(tbody, rows, columns, emptyText) {
    tbody.replaceChildren(...rows);
    if (!rows.length) {
      tbody.append(el("tr", {}, el("td", { className: "empty", colSpan: columns }, emptyText)));
    }
  }

  function showSecret(name, secret) {
    $("secret-for").textContent = name;
    $("secret").textContent = secret;
    $("secret-box").hidden = false;
  }

  const time = (iso) => new Date(iso).toLocaleString();

  // Endpoints ------------------------------------------------------------------------

  async function ensureTestRoute(name, propagations) {
    const type = `portal.test.${name}`;
    const found = propagations.some(
      (p) => p.source === TEST_SOURCE && p.targets.includes(name) && p.types === type,
    );
    if (!found) {
      await api("POST", "/v1/propagations", {
        mode: "unidirectional", source: TEST_SOURCE, targets: [name], types: type,
      });
    }
    return type;
  }

  async function sendTest(name) {
    const type = await ensureTestRoute(name, await api("GET", "/v1/propagations"));
    const sent = await api("POST", "/v1/events", {
      source: TEST_SOURCE,
      type,
      data: { test: true, endpoint: name, tenant, sent_at: new Date().toISOString() },
    });
    return sent.id;
  }

  function endpointRow(t, sources) {
    const paused = t.status === "disabled";
    const urlInput = el("input", { type: "url", value: t.url || "", className: "edit-url" });
    urlInput.hidden = true;
    const urlText = el("span", { className: "url-text", textContent: t.url || "" });
    const save = button("Save", "save", () =>
      act(`Saved ${t.name}`, async () => {
        await api("PATCH", `/v1/targets/${t.name}`, { url: urlInput.value });
        urlInput.hidden = true;  // closed, so the refresh that follows may redraw the row
      }));
    save.hidden = true;
    const edit = button("Edit", "edit", () => {
      urlInput.hidden = false; save.hidden = false; urlText.hidden = true; edit.hidden = true;
      urlInput.focus();
    });
    const actions = el("td", { className: "actions" },
      edit, save,
      button(paused ? "Resume" : "Pause", paused ? "resume" : "pause", () =>
        act(`${paused ? "Resumed" : "Paused"} ${t.name}`, () =>
          api("POST", `/v1/targets/${t.name}/${paused ? "resume" : "pause"}`))),
      button("Rotate secret", "rotate", () =>
        act(`New secret for ${t.name}; the old one signs for 24 h`, async () => {
          const r = await api("POST", `/v1/targets/${t.name}/rotate-secret`, {});
          showSecret(t.name, r.secret);
        })),
      button("Send test event", "test", () =>
        act("", async () => show("notice", `Test event ${await sendTest(t.name)} sent to ${t.name}`))),
    );
    const row = el("tr", { className: "endpoint" },
      el("td", { className: "name", textContent: t.name }),
      el("td", { className: "url" }, urlText, urlInput),
      el("td", { className: "sources", textContent: sources.join(", ") }),
      el("td", { className: "status", textContent: t.status + (t.rotating ? " (rotating)" : "") }),
      actions);
    row.dataset.name = t.name;
    return row;
  }

  function editing() {
    return document.querySelector(".edit-url:not([hidden])") !== null;
  }

  async function loadEndpoints() {
    const [targets, props] = await Promise.all([
      api("GET", "/v1/targets"), api("GET", "/v1/propagations"),
    ]);
    const hooks = targets.filter((t) => t.kind === "webhook");
    const sourcesOf = (name) => props
      .filter((p) => p.source !== TEST_SOURCE && (p.mode === "broadcast" || p.targets.includes(name)))
      .map((p) => p.source);
    // A refresh already on its way when the user opened an editor must not redraw it away.
    if (!editing()) {
      fill($("endpoints").tBodies[0], hooks.map((t) => endpointRow(t, sourcesOf(t.name))), 5,
        "No endpoints yet: add one below.");
    }
    return new Set(hooks.map((t) => t.name));
  }

  $("add-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const name = $("add-name").value.trim();
    const url = $("add-url").value.trim();
    const source = $("add-source").value.trim();
    const retries = Number($("add-retries").value || 5);
    act(`Added ${name}`, async () => {
      const created = await api("POST", "/v1/targets", {
        name, kind: "webhook", url, retry: { max_retries: retries },
      });
      if (source) {
        await api("POST", "/v1/propagations", { mode: "unidirectional", source, targets: [name] });
      }
      showSecret(name, created.secret);
      $("add-form").reset();
    });
  });

  $("secret-done").addEventListener("click", () => {
    $("secret").textContent = "";
    $("secret-box").hidden = true;
  });

  // Deliveries and dead letters ------------------------------------------------------

  async function retryDelivery(d) {
    const detail = await api("GET", `/v1/events/${encodeURIComponent(d.event_id)}`);
    if (!detail.event || detail.event.seq == null) {
      throw new Error(`event ${d.event_id} is not stored any more: it cannot be sent again`);
    }
    const seq = detail.event.seq;
    await api("POST", `/v1/targets/${d.target}/replay`, { from_seq: seq, to_seq: seq });
  }

  async function viewRequest(eventId) {
    const detail = await api("GET", `/v1/events/${encodeURIComponent(eventId)}`);
    $("request-id").textContent = eventId;
    $("request-body").textContent = JSON.stringify(detail.event, null, 2);
    $("request-box").hidden = false;
  }

  function deliveryRow(d) {
    const failed = d.outcome !== "delivered" && d.outcome !== "skipped";
    const row = el("tr", { className: `delivery outcome-${d.outcome}` },
      el("td", {}, time(d.at)),
      el("td", { className: "target" }, d.target),
      el("td", { className: "event" },
        button(d.event_id, "request", () => act("", () => viewRequest(d.event_id)))),
      el("td", {}, d.attempt),
      el("td", { className: "outcome" }, d.outcome),
      el("td", { className: "status-code" }, d.status_code ?? "–"),
      el("td", {}, d.latency_ms == null ? "–" : `${Math.round(d.latency_ms)} ms`),
      el("td", { className: "excerpt" }, d.response_excerpt || d.error || ""),
      el("td", {}, failed
        ? button("Retry", "retry", () => act(`Sent ${d.event_id} to ${d.target} again`, () => retryDelivery(d)))
        : ""));
    row.dataset.event = d.event_id;
    return row;
  }

  // A session is a tenant key: it lists one endpoint's deliveries at a time.
  const perEndpoint = (mine, path) => Promise.all([...mine].map((name) =>
    api("GET", `${path}&target=${encodeURIComponent(name)}`)));

  async function loadDeliveries(mine) {
    const pages = await perEndpoint(mine, "/v1/deliveries?limit=50");
    const items = pages.flatMap((p) => p.items).sort((a, b) => (a.at < b.at ? 1 : -1));
    fill($("deliveries").tBodies[0], items.slice(0, 100).map(deliveryRow), 9, "No deliveries yet.");
  }

  function letterRow(l) {
    const row = el("tr", { className: "dead-letter" },
      el("td", {}, time(l.at)),
      el("td", { className: "target" }, l.target),
      el("td", { className: "event" }, l.event_id),
      el("td", {}, l.type ?? ""),
      el("td", {}, l.attempts),
      el("td", { className: "excerpt" }, l.error),
      el("td", {}, button("Replay", "replay", () =>
        act(`Replayed ${l.event_id} to ${l.target}`, () =>
          api("POST", `/v1/dead-letters/${encodeURIComponent(l.dlq_id)}/retry`)))));
    row.dataset.event = l.event_id;
    return row;
  }

  async function loadDeadLetters(mine) {
    const lists = await perEndpoint(mine, "/v1/dead-letters?limit=100");
    const items = lists.flatMap((l) => l.items).sort((a, b) => (a.at < b.at ? 1 : -1));
    fill($("dead-letters").tBodies[0], items.map(letterRow), 7, "No dead letters.");
  }

  let busy = false;
  async function refresh() {
    if (busy) return;
    busy = true;
    try {
      const mine = await loadEndpoints();
      await Promise.all([loadDeliveries(mine), loadDeadLetters(mine)]);
      document.body.dataset.loaded = String(Date.now());
    } catch (err) {
      show("error", err.message);
    } finally {
      busy = false;
    }
  }

  $("tenant").textContent = tenant;
  $("expires").textContent = time(meta("mesh-expires"));
  $("refresh").addEventListener("click", () => refresh());
  refresh();
  // Deliveries arrive on their own: poll, but not while the user edits a URL.
  setInterval(() => {
    if (!editing()) refresh();
  }, 2000);
})();
