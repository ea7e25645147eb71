// The proxyvm operator console. Plain JS, no framework, nothing loaded from elsewhere.
// Every value from the server reaches the page through textContent or an attribute set with
// setAttribute (never innerHTML), so a name or a query with HTML in it stays text.
"use strict";

let CSRF = "";
const PROTOCOLS = ["dns", "smtp", "snmp", "http", "ws", "tls"];

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") e.textContent = String(v);
    else e.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }

function guestLink(name) {
  return el("a", { href: "/console/guest?name=" + encodeURIComponent(name), class: "guest-link" }, name);
}

function sparkline(series) {
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 160 28");
  svg.setAttribute("preserveAspectRatio", "none");
  const max = Math.max(1, ...series);
  const step = series.length > 1 ? 160 / (series.length - 1) : 160;
  const pts = series.map((v, i) => `${(i * step).toFixed(1)},${(27 - (v / max) * 25).toFixed(1)}`);
  const line = document.createElementNS(NS, "polyline");
  line.setAttribute("points", pts.join(" "));
  svg.append(line);
  const title = document.createElementNS(NS, "title");
  title.textContent = `requests per 5 s over the last 5 minutes (max ${max})`;
  svg.append(title);
  return svg;
}

function rateText(rate) {
  const parts = Object.entries(rate || {}).map(([p, r]) => `${p} ${r}/s`);
  return parts.length ? parts.join(", ") : "idle";
}

function quarantineText(q) {
  return q ? `${q.profile} since ${q.since || "?"} by ${q.by || "?"}${q.user ? " (" + q.user + ")" : ""}` : "";
}

async function api(path) {
  const r = await fetch(path, { credentials: "same-origin" });
  if (r.status === 401) { location.href = "/console/login"; throw new Error("logged out"); }
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

async function post(path, fields) {
  const r = await fetch(path, {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/x-www-form-urlencoded", "X-CSRF-Token": CSRF },
    body: new URLSearchParams(fields).toString(),
  });
  const body = await r.json().catch(() => ({ error: r.statusText }));
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function live(query, onData) {
  const live = document.getElementById("live");
  const es = new EventSource("/console/api/events?" + new URLSearchParams(query).toString());
  es.onopen = () => { live.textContent = "●"; live.className = "on"; };
  es.onerror = () => { live.textContent = "○"; live.className = ""; };
  es.onmessage = (ev) => onData(JSON.parse(ev.data));
  es.addEventListener("logout", () => { es.close(); location.href = "/console/login"; });
  return es;
}

// -- overview -------------------------------------------------------------------------------
function renderOverview(main, data) {
  clear(main);
  const services = el("div", { class: "cards", id: "services" });
  for (const [name, state] of Object.entries(data.services || {})) {
    services.append(el("div", { class: "card" }, name, el("b", { class: state === "ok" ? "ok" : "deny" }, state)));
  }
  main.append(el("h2", {}, "Services"), services, el("h2", {}, "Guests"));
  const table = el("table", { id: "guests" },
    el("tr", {}, ...["guest", "rate", "allowed", "denied", "alerts", "quarantine", "last 5 min"].map((h) => el("th", {}, h))));
  for (const g of data.guests) {
    table.append(el("tr", { "data-guest": g.name },
      el("td", {}, guestLink(g.name)),
      el("td", { class: "rate" }, rateText(g.rate)),
      el("td", { class: "num allow" }, g.allowed),
      el("td", { class: "num deny" }, g.denied),
      el("td", { class: "num" + (g.alerts ? " alert" : "") }, g.alerts),
      el("td", { class: "quarantine" + (g.quarantine ? " quarantined" : "") }, quarantineText(g.quarantine) || "—"),
      el("td", {}, sparkline(g.series && g.series.length ? g.series : [0]))));
  }
  main.append(table, el("p", { class: "muted" }, `policy mode ${data.policy_mode}; last record #${data.seq}`));
}

function pageOverview(main) {
  api("/console/api/overview").then((d) => renderOverview(main, d)).catch((e) => showError(main, e));
  live({ view: "overview" }, (d) => renderOverview(main, d));
}

// -- audit ----------------------------------------------------------------------------------
const FILTERS = ["guest", "protocol", "verdict", "rule", "kind", "text"];

function recordRow(r) {
  return el("tr", { class: "record", "data-seq": r.seq },
    el("td", { class: "mono" }, r.seq), el("td", { class: "mono" }, r.ts),
    el("td", {}, r.guest ? guestLink(r.guest) : "—"), el("td", {}, r.protocol),
    el("td", { class: r.verdict === "deny" ? "deny" : r.verdict === "allow" ? "allow" : "" }, r.verdict || r.kind),
    el("td", { class: "mono" }, r.rule || ""), el("td", { class: "what" }, r.what || ""),
    el("td", { class: "reason" }, r.reason || ""));
}

function recordTable(id, records) {
  const t = el("table", { id },
    el("tr", {}, ...["#", "time", "guest", "protocol", "verdict", "rule", "request", "reason"].map((h) => el("th", {}, h))));
  for (const r of records) t.append(recordRow(r));
  return t;
}

function pageAudit(main) {
  const params = new URLSearchParams(location.search);
  const form = el("form", { class: "filters", id: "filters" });
  const select = (name, options) => {
    const s = el("select", { name, id: "f-" + name }, el("option", { value: "" }, "any"));
    for (const o of options) s.append(el("option", { value: o }, o));
    s.value = params.get(name) || "";
    return s;
  };
  const input = (name, placeholder) => {
    const i = el("input", { name, id: "f-" + name, placeholder, maxlength: 200 });
    i.value = params.get(name) || "";
    return i;
  };
  form.append(
    el("label", {}, "guest", input("guest", "exact name")),
    el("label", {}, "protocol", select("protocol", PROTOCOLS.concat(["proxyvm"]))),
    el("label", {}, "verdict", select("verdict", ["allow", "deny"])),
    el("label", {}, "rule", input("rule", "rule id")),
    el("label", {}, "kind", select("kind", ["decision", "alert", "quarantine", "release", "console", "service", "reload"])),
    el("label", {}, "text", input("text", "contains (literal)")),
    el("button", { type: "submit", id: "apply" }, "Filter"));
  const status = el("p", { class: "muted", id: "audit-status" });
  const holder = el("div");
  main.append(el("h2", {}, "Recent audit records"), form, status, holder);
  let es = null;
  let table = null;
  const start = () => {
    const q = {};
    for (const f of FILTERS) { const v = form.elements[f].value; if (v) q[f] = v; }
    history.replaceState(null, "", "/console/audit" + (Object.keys(q).length ? "?" + new URLSearchParams(q) : ""));
    if (es) es.close();
    api("/console/api/audit?" + new URLSearchParams(q)).then((d) => {
      clear(holder);
      table = recordTable("records", d.records);
      holder.append(table);
      status.textContent = `${d.records.length} records shown (newest first); live`;
      es = live({ view: "audit", after: d.seq, ...q }, (u) => {
        const head = table.querySelector("tr");
        for (const r of u.records.slice().reverse()) head.after(recordRow(r));
        while (table.rows.length > 501) table.deleteRow(-1);
        status.textContent = `${table.rows.length - 1} records shown (newest first); live`;
      });
    }).catch((e) => { clear(holder); holder.append(el("p", { class: "error", id: "audit-error" }, e.message)); });
  };
  form.addEventListener("submit", (ev) => { ev.preventDefault(); start(); });
  start();
}

// -- one guest ------------------------------------------------------------------------------
function renderGuest(main, g) {
  clear(main);
  main.append(el("h1", { id: "guest-name" }, g.name));
  const q = g.quarantine;
  main.append(el("p", { id: "guest-quarantine", class: q ? "quarantined" : "ok" },
    q ? "Quarantined: " + quarantineText(q) + (q.reason ? ` — ${q.reason}` : "") : "Not quarantined"));
  const actions = el("form", { class: "actions", id: "quarantine-form" });
  const reason = el("input", { name: "reason", id: "q-reason", placeholder: "why (goes into the audit record)", maxlength: 500, size: 40 });
  const msg = el("span", { id: "q-message" });
  if (q) {
    actions.append(el("label", {}, "reason", reason), el("button", { type: "submit", id: "release" }, "Release"), msg);
  } else {
    const profile = el("select", { name: "profile", id: "q-profile" },
      el("option", { value: "block" }, "block"), el("option", { value: "honeypot" }, "honeypot"));
    actions.append(el("label", {}, "profile", profile), el("label", {}, "reason", reason),
      el("button", { type: "submit", id: "quarantine" }, "Quarantine"), msg);
  }
  actions.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const fields = { guest: g.name, reason: reason.value };
    if (!q) fields.profile = actions.elements.profile.value;
    post(q ? "/console/api/release" : "/console/api/quarantine", fields)
      .then(() => api("/console/api/guest?name=" + encodeURIComponent(g.name)).then((d) => renderGuest(main, d)))
      .catch((e) => { msg.textContent = e.message; msg.className = "error"; });
  });
  main.append(actions);
  if (g.series) {
    main.append(el("div", { class: "cards" },
      el("div", { class: "card" }, "rate", el("b", { id: "guest-rate" }, rateText(g.rate))),
      el("div", { class: "card" }, "allowed", el("b", { class: "allow" }, g.allowed)),
      el("div", { class: "card" }, "denied", el("b", { class: "deny", id: "guest-denied" }, g.denied)),
      el("div", { class: "card" }, "alerts", el("b", { class: g.alerts ? "alert" : "" }, g.alerts)),
      el("div", { class: "card" }, "last 5 min", sparkline(g.series))));
  }
  main.append(el("h2", {}, "Rules that apply"), (() => {
    const t = el("table", { id: "rules" }, el("tr", {}, ...["rule", "action", "protocol", "guests", "where"].map((h) => el("th", {}, h))));
    for (const r of g.rules || []) {
      t.append(el("tr", {}, el("td", { class: "mono" }, r.id), el("td", { class: r.action === "deny" ? "deny" : "allow" }, r.action),
        el("td", {}, r.protocol), el("td", {}, r.guests ? r.guests.join(", ") : "every guest"),
        el("td", { class: "mono", title: r.file }, `${r.file}:${r.line}`)));
    }
    return t;
  })(), el("p", { class: "muted" }, `rules file ${g.policy_file || ""}; rules are tried in file order, the first match decides`));
  const dests = el("table", { id: "destinations" }, el("tr", {}, el("th", {}, "destination"), el("th", {}, "requests")));
  for (const [d, n] of g.destinations || []) dests.append(el("tr", {}, el("td", { class: "mono" }, d), el("td", { class: "num" }, n)));
  main.append(el("h2", {}, "Top destinations"), dests);
  main.append(el("h2", {}, "Baseline"), baselineView(g.baseline));
  main.append(el("h2", {}, "Recent denials"), recordTable("denials", g.denials || []));
  main.append(el("h2", {}, "Recent alerts"), recordTable("alerts", g.alerts_recent || []));
}

// The new_destination detector's baseline: what counts as "seen before" for this guest.
function baselineView(b) {
  const box = el("div", { id: "baseline" });
  if (!b) {
    box.append(el("p", { class: "muted" }, "the new_destination detector is off: no baseline"));
  } else if (b.source === "rules") {
    box.append(el("p", {}, "from the rules file ", el("span", { class: "mono" }, b.file)));
  } else {
    box.append(el("p", {}, `learned from ${b.records} allowed requests, ${b.destinations} destinations` +
      (b.active ? "" : ` (not active before ${b.min_records} requests: nothing is "new" yet)`)));
    const list = el("ul", { class: "mono" });
    for (const d of b.named || []) list.append(el("li", {}, d));
    if (b.destinations > (b.named || []).length) list.append(el("li", { class: "muted" }, `and ${b.destinations - b.named.length} more`));
    box.append(list);
  }
  return box;
}

function pageGuest(main) {
  const name = new URLSearchParams(location.search).get("name") || "";
  const url = "/console/api/guest?name=" + encodeURIComponent(name);
  api(url).then((g) => {
    renderGuest(main, g);
    let quarantined = !!g.quarantine;
    live({ view: "guest", name }, (u) => {
      if (u.error) return;
      // re-render on a change of state; otherwise only refresh the numbers (keeps what is typed)
      if (!!u.quarantine !== quarantined) { quarantined = !!u.quarantine; renderGuest(main, u); return; }
      const rate = document.getElementById("guest-rate");
      if (rate) rate.textContent = rateText(u.rate);
      const denied = document.getElementById("guest-denied");
      if (denied) denied.textContent = u.denied;
    });
  }).catch((e) => showError(main, e, "guest-error"));
}

// -- health ---------------------------------------------------------------------------------
function renderHealth(main, h) {
  clear(main);
  main.append(el("h2", {}, `Status: ${h.status} (policy mode ${h.policy_mode})`));
  const t = el("table", { id: "health" }, el("tr", {}, ...["service", "state", "pid", "restarts", "listening", "detail"].map((x) => el("th", {}, x))));
  for (const [name, s] of Object.entries(h.services || {})) {
    const detail = Object.entries(s.detail || {}).filter(([, v]) => typeof v !== "object")
      .map(([k, v]) => `${k}=${v}`).join(" ");
    t.append(el("tr", {}, el("td", {}, name), el("td", { class: s.state === "ok" ? "ok" : "deny" }, s.state),
      el("td", {}, s.pid || ""), el("td", { class: "num" }, s.restarts || 0),
      el("td", { class: "mono" }, (s.listening || []).join(" ")), el("td", { class: "mono" }, s.reason || s.last_error || detail)));
  }
  main.append(t);
}

function pageHealth(main) {
  api("/console/api/health").then((h) => renderHealth(main, h)).catch((e) => showError(main, e));
  live({ view: "health" }, (h) => renderHealth(main, h));
}

function showError(main, e, id) {
  clear(main);
  main.append(el("p", { class: "error", id: id || "error" }, e.message));
}

document.addEventListener("DOMContentLoaded", () => {
  const main = document.getElementById("main");
  api("/console/api/session").then((s) => {
    CSRF = s.csrf || "";
    document.getElementById("who").textContent = s.who;
    document.querySelector("#logout-form input[name=csrf]").value = CSRF;
    const page = document.body.dataset.page;
    ({ overview: pageOverview, audit: pageAudit, guest: pageGuest, health: pageHealth })[page](main);
  }).catch((e) => showError(main, e));
});
