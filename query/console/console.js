// The Custos console: plain DOM over the node's own REST API. Every value from the API is
// inserted with textContent, never as HTML. The token lives in sessionStorage and is sent
// only to this origin.
"use strict";

const $ = (selector) => document.querySelector(selector);
let token = sessionStorage.getItem("custos-token");
// On a query node over a partition set: the partition whose log to read (sent as the
// X-Custos-Partition header); empty lets the node choose from the token's realm, and SQL
// (the fleet, findings, actions and agent pages) then reads every partition.
let partition = sessionStorage.getItem("custos-partition") || "";
let stream = null;
// Whether this node holds the log (a writer, or one process): it then serves the agents,
// findings, actions and control routes. A query node serves the query API alone, and the
// console reads the same facts through SQL there.
let writer = true;

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  return node;
}

function short(did) {
  return did && did.length > 24 ? did.slice(0, 16) + "…" + did.slice(-6) : did;
}

async function api(path, options) {
  const init = Object.assign({ headers: {} }, options || {});
  init.headers = Object.assign({ Authorization: "Bearer " + token }, partition ? { "X-Custos-Partition": partition } : {}, init.headers);
  const response = await fetch(path, init);
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = text; }
  if (!response.ok) {
    let message = body && body.message ? body.message : text;
    const code = body && body.error ? body.error : "";
    // The console sends the partition chosen at sign-in as the header the node asks for.
    if (code === "partition_required") message += " (in the console: sign out, and sign in naming a partition)";
    const error = new Error(response.status + " " + code + ": " + message);
    error.status = response.status;
    error.code = code;
    throw error;
  }
  return body;
}

async function sql(query) {
  return api("/v1/sql", {
    method: "POST",
    headers: { "content-type": "application/json", accept: "application/json" },
    body: JSON.stringify({ sql: query }),
  });
}

// A SQL string literal.
function quote(text) {
  return "'" + String(text).replace(/'/g, "''") + "'";
}

// A JSON text column (findings' evidence and explanation), parsed; `fallback` when absent.
function parsed(text, fallback) {
  if (text === null || text === undefined || text === "") return fallback;
  if (typeof text !== "string") return text;
  try { return JSON.parse(text); } catch (_) { return fallback; }
}

// Findings as GET /v1/findings gives them, from the findings table (query nodes).
async function findingsBySql(where, limit) {
  const rows = await sql(`SELECT id, ts, agent, realm, type, score, severity, confidence, learning, title, rule_id, evidence, explanation FROM findings${where} ORDER BY ts DESC LIMIT ${limit}`);
  return rows.map((row) => Object.assign({}, row, { evidence: parsed(row.evidence, []), explanation: parsed(row.explanation, []) }));
}

function table(rows) {
  const result = el("table");
  if (!rows || rows.length === 0) {
    result.append(el("caption", "no rows"));
    return result;
  }
  const columns = Object.keys(rows[0]);
  const head = el("tr");
  columns.forEach((column) => head.append(el("th", column)));
  const thead = el("thead");
  thead.append(head);
  result.append(thead);
  const body = el("tbody");
  for (const row of rows) {
    const line = el("tr");
    columns.forEach((column) => {
      const value = row[column];
      line.append(el("td", value === null || value === undefined ? "" : typeof value === "object" ? JSON.stringify(value) : value));
    });
    body.append(line);
  }
  result.append(body);
  return result;
}

// Views ------------------------------------------------------------------------------

const views = {
  async fleet() {
    const [agents, findings] = writer
      ? await Promise.all([api("/v1/agents?limit=100000"), api("/v1/findings?limit=10000")])
      // One query after the other: a token runs two at most at once.
      : [{ agents: await sql("SELECT did, realm, status, events, last_ts FROM agents ORDER BY did") },
        { findings: await sql("SELECT agent, max(score) AS score FROM findings GROUP BY agent") }];
    const risk = {};
    for (const finding of findings.findings) risk[finding.agent] = Math.max(risk[finding.agent] || 0, finding.score);
    const body = $("#fleet-table tbody");
    body.replaceChildren();
    const sorted = agents.agents.slice().sort((a, b) => (risk[b.did] || 0) - (risk[a.did] || 0) || a.did.localeCompare(b.did));
    for (const agent of sorted) {
      const row = el("tr", null, { "data-did": agent.did });
      const link = el("a", short(agent.did), { href: "#agent/" + agent.did, class: "did", title: agent.did });
      row.append(el("td")); row.lastChild.append(link);
      row.append(el("td", agent.realm));
      row.append(el("td", agent.status, { class: "status status-" + agent.status }));
      row.append(el("td", risk[agent.did] || 0, { class: "risk" }));
      row.append(el("td", agent.events));
      row.append(el("td", agent.last_ts || "never"));
      body.append(row);
    }
  },

  async agent(did) {
    const agent = writer ? await api("/v1/agents/" + encodeURIComponent(did)) : await agentBySql(did);
    $("#agent-did").textContent = agent.did;
    const facts = $("#agent-facts");
    facts.replaceChildren();
    const fact = (name, value) => { facts.append(el("dt", name)); facts.append(el("dd", value === null || value === undefined || value === "" ? "—" : value)); };
    fact("status", agent.status);
    fact("realm", agent.realm);
    fact("parent", agent.parent);
    fact("children", (agent.children || []).join(", "));
    fact("labels", JSON.stringify(agent.labels || {}));
    fact("enrolled", agent.enrolled_at + " by " + agent.enrolled_by);
    fact("events", agent.events);
    fact("last activity", agent.last_ts);
    if (agent.revoke_reason) fact("revoked because", agent.revoke_reason);
    const baseline = agent.baseline;
    if (baseline) {
      fact("baseline", `${baseline.windows_learned} windows learned${baseline.learning ? ` (learning: judged against peers until ${baseline.min_windows})` : ""}, active in ${baseline.active_hours_of_week} hours of the week`);
      const expected = Object.entries(baseline.features || {}).filter(([, stat]) => stat.expected > 0)
        .map(([name, stat]) => `${name} ≈ ${Number(stat.expected).toFixed(1)}`).join(", ");
      fact("expected per window", expected || "nothing yet");
    } else {
      fact("baseline", writer ? "not known to the detector yet" : "kept by the detector; ask the log writer's node");
    }
    const list = (selector, items, render) => {
      const node = $(selector);
      node.replaceChildren();
      if (items.length === 0) node.append(el("li", "none"));
      items.slice(0, 20).forEach((item) => node.append(el("li", render(item))));
    };
    list("#agent-findings", agent.recent_findings || [], (f) => `${f.ts} ${f.severity} ${f.score} ${f.title}`);
    list("#agent-actions", agent.recent_actions || [], (a) => `${a.ts} ${a.action} ${a.status} (${a.playbook})`);
  },

  async findings() {
    const answer = writer ? await api("/v1/findings?limit=500") : { findings: await findingsBySql("", 500) };
    const list = $("#findings-list");
    list.replaceChildren();
    const findings = answer.findings.slice().sort((a, b) => b.ts.localeCompare(a.ts));
    if (findings.length === 0) list.append(el("li", "no findings yet"));
    for (const finding of findings) {
      const item = el("li", null, { "data-id": finding.id });
      item.append(el("span", finding.ts + " "));
      item.append(el("span", finding.severity, { class: "sev-" + finding.severity }));
      item.append(el("span", ` ${finding.score} ${finding.type || finding.finding_type} — `));
      const open = el("a", finding.title, { href: "#", class: "open-finding" });
      open.addEventListener("click", (event) => { event.preventDefault(); openFinding(finding); });
      item.append(open);
      item.append(el("span", " " + short(finding.agent), { class: "did", title: finding.agent }));
      list.append(item);
    }
  },

  async actions() {
    const [approvals, actions] = writer
      ? await Promise.all([api("/v1/approvals"), api("/v1/actions?limit=200")])
      : [{ pending: [] }, { actions: await sql("SELECT ts, action, agent, status, playbook, reason FROM actions ORDER BY ts DESC LIMIT 200") }];
    const list = $("#pending-list");
    list.replaceChildren();
    $("#actions-error").textContent = "";
    if (!writer) list.append(el("li", "approvals are decided on the log writer's node (this is a query node)", { class: "query-node-note" }));
    else if (approvals.pending.length === 0) list.append(el("li", "nothing is waiting for approval"));
    for (const approval of approvals.pending) {
      const item = el("li", null, { "data-id": approval.id, class: "approval" });
      const what = (approval.remaining || []).map((spec) => Object.keys(spec)[0] || JSON.stringify(spec)).join(", ");
      item.append(el("span", `${approval.playbook}: ${approval.finding.title} on ${short(approval.finding.agent)} → ${what || "action"} (expires ${approval.expires_at}) `));
      for (const decision of ["approve", "deny"]) {
        const button = el("button", decision === "approve" ? "Approve" : "Deny", { type: "button", class: decision });
        button.addEventListener("click", async () => {
          try {
            await api(`/v1/approvals/${encodeURIComponent(approval.id)}/${decision}`, { method: "POST" });
            await views.actions();
          } catch (error) {
            $("#actions-error").textContent = error.message;
          }
        });
        item.append(button);
      }
      list.append(item);
    }
    const body = $("#actions-table tbody");
    body.replaceChildren();
    for (const action of actions.actions.slice().sort((a, b) => b.ts.localeCompare(a.ts))) {
      const row = el("tr");
      [action.ts, action.action, short(action.agent), action.status, action.playbook, action.reason].forEach((value) => row.append(el("td", value)));
      body.append(row);
    }
  },

  async events() {},
  async sql() {},

  async integrity() {
    const answer = await api("/v1/integrity");
    const facts = $("#integrity-facts");
    facts.replaceChildren();
    const fact = (name, value) => { facts.append(el("dt", name)); facts.append(el("dd", value === null || value === undefined ? "—" : value, { id: "integrity-" + name.replace(/ /g, "-") })); };
    const checkpoint = answer.checkpoint;
    fact("tree size", checkpoint.size);
    fact("root", checkpoint.root);
    fact("origin", checkpoint.origin);
    fact("node key", checkpoint.node_did);
    fact("log key", checkpoint.verifier_key);
    const last = answer.last_verify;
    fact("last verify", last ? `${last.ok ? "OK" : "FAILED"} at ${last.at}: ${last.entries} entries, ${last.problems} problem(s)${last.first_problem ? " — " + last.first_problem : ""}` : "never run on this node");
  },
};

// One agent as GET /v1/agents/{did} gives it, from the SQL tables (query nodes): no
// baseline (the detector keeps it), `children` as a count.
async function agentBySql(did) {
  // One query after the other: a token runs two at most at once.
  const agents = await sql(`SELECT did, realm, status, parent, children, labels, enrolled_at, enrolled_by, revoke_reason, events, last_ts FROM agents WHERE did = ${quote(did)}`);
  const findings = await findingsBySql(` WHERE agent = ${quote(did)}`, 20);
  const actions = await sql(`SELECT ts, action, status, playbook FROM actions WHERE agent = ${quote(did)} ORDER BY ts DESC LIMIT 20`);
  if (agents.length === 0) {
    const error = new Error(`404 unknown_agent: no agent ${did} in what this token may read`);
    error.status = 404;
    throw error;
  }
  const agent = agents[0];
  return Object.assign({}, agent, {
    children: agent.children ? [`${agent.children} sub-agent(s)`] : [],
    labels: parsed(agent.labels, {}),
    baseline: null,
    recent_findings: findings,
    recent_actions: actions,
  });
}

async function openFinding(finding) {
  $("#finding-detail").hidden = false;
  $("#finding-title").textContent = finding.title;
  $("#finding-meta").textContent = `${finding.severity} (score ${finding.score}, confidence ${finding.confidence}) on ${finding.agent} in ${finding.realm} at ${finding.ts}` +
    (finding.rule_id ? `; rule ${finding.rule_id}` : "") + (finding.learning ? "; baseline still learning" : "");
  const explanation = $("#finding-explanation tbody");
  explanation.replaceChildren();
  for (const part of finding.explanation || []) {
    const row = el("tr");
    [part.feature, part.observed, part.expected, part.deviation.toFixed(2)].forEach((value) => row.append(el("td", value)));
    explanation.append(row);
  }
  const evidence = $("#finding-evidence tbody");
  evidence.replaceChildren();
  const indexes = (finding.evidence || []).filter((index) => Number.isInteger(index)).slice(0, 200);
  if (indexes.length === 0) return;
  try {
    // The agent too: over a partition set, log indexes repeat from one partition to the next.
    const rows = await sql(`SELECT log_index, ts, kind, action, target, outcome FROM events WHERE agent = ${quote(finding.agent)} AND log_index IN (${indexes.join(",")}) ORDER BY log_index`);
    for (const event of rows) {
      const row = el("tr", null, { class: "evidence-row" });
      [event.log_index, event.ts, event.kind, event.action, event.target, event.outcome].forEach((value) => row.append(el("td", value)));
      evidence.append(row);
    }
  } catch (error) {
    evidence.append(el("tr")).append(el("td", error.message, { colspan: 6, class: "error" }));
  }
}

// Event search and SQL -----------------------------------------------------------------

let eventsCursor = null;
async function searchEvents(more) {
  const params = new URLSearchParams();
  for (const [name, value] of new FormData($("#events-form"))) if (value) params.set(name, value);
  params.set("limit", "100");
  if (more && eventsCursor !== null) params.set("after", eventsCursor);
  const target = $("#events-result");
  try {
    const answer = await api("/v1/events?" + params);
    eventsCursor = answer.next;
    if (more) {
      const body = target.querySelector("tbody");
      const fresh = table(answer.events).querySelector("tbody");
      if (body && fresh) body.append(...fresh.children); else target.replaceChildren(table(answer.events));
    } else {
      target.replaceChildren(table(answer.events));
    }
    $("#events-more").hidden = answer.next === null || answer.next === undefined;
  } catch (error) {
    target.replaceChildren(el("p", error.message, { class: "error" }));
  }
}

async function runSql() {
  const target = $("#sql-result");
  target.replaceChildren(el("p", "running…"));
  try {
    target.replaceChildren(table(await sql($("#sql-text").value)));
  } catch (error) {
    target.replaceChildren(el("p", error.message, { class: "error" }));
  }
}

// Live updates from the control stream (fetch, because EventSource cannot send a token) ---

async function live() {
  if (stream) stream.abort();
  stream = new AbortController();
  // A query node has no control stream: views refresh when opened.
  if (!writer) return;
  $("#live").hidden = false;
  const state = $("#live-state");
  try {
    const response = await fetch("/v1/control/stream", { headers: { Authorization: "Bearer " + token }, signal: stream.signal });
    if (!response.ok) { state.textContent = "(not available to this role)"; return; }
    state.textContent = "(connected)";
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let split;
      while ((split = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, split);
        buffer = buffer.slice(split + 2);
        const data = block.split("\n").filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trim()).join("\n");
        if (!data) continue;
        let change = {};
        try { change = JSON.parse(data); } catch (_) { continue; }
        const item = el("li", `${new Date().toISOString().slice(11, 19)} ${change.event || "change"} ${short(change.agent || change.memory_id || change.did || "")}`, { class: "live-item" });
        $("#live-list").prepend(item);
        refresh();
      }
    }
    state.textContent = "(closed)";
  } catch (error) {
    if (error.name !== "AbortError") state.textContent = "(disconnected)";
  }
}

// Navigation ---------------------------------------------------------------------------

let refreshing = null;
function refresh() {
  clearTimeout(refreshing);
  refreshing = setTimeout(show, 200);
}

async function show() {
  if (!token) return;
  const hash = location.hash.slice(1) || "fleet";
  const [name, ...rest] = hash.split("/");
  const view = views[name] ? name : "fleet";
  document.querySelectorAll(".view").forEach((section) => { section.hidden = section.id !== view + "-view"; });
  document.querySelectorAll("nav a").forEach((link) => link.classList.toggle("active", link.dataset.view === view));
  try {
    await views[view](decodeURIComponent(rest.join("/")));
  } catch (error) {
    if (error.status === 401) return signOut("the token was refused: " + error.message);
    const section = $("#" + view + "-view");
    let note = section.querySelector(".view-error");
    if (!note) { note = el("p", null, { class: "error view-error", role: "alert" }); section.prepend(note); }
    note.textContent = error.message;
    return;
  }
  const note = document.querySelector("#" + view + "-view .view-error");
  if (note) note.remove();
}

function signOut(reason) {
  token = null;
  sessionStorage.removeItem("custos-token");
  sessionStorage.removeItem("custos-partition");
  partition = "";
  if (stream) stream.abort();
  $("#nav").hidden = true;
  $("#live").hidden = true;
  document.querySelectorAll(".view").forEach((section) => { section.hidden = true; });
  $("#signin-view").hidden = false;
  $("#signin-error").textContent = reason || "";
}

// Whether the node serves the log writer's routes, from its public route catalogue.
async function holdsTheLog() {
  try {
    const response = await fetch("/openapi.json");
    const catalogue = await response.json();
    const findings = catalogue.paths && catalogue.paths["/v1/findings"];
    return Boolean(findings && findings.get);
  } catch (_) {
    return true;
  }
}

async function signIn(candidate, chosen) {
  token = candidate;
  partition = (chosen || "").trim();
  try {
    writer = await holdsTheLog();
    let whoami;
    if (writer) {
      const checkpoint = await api("/v1/checkpoints/latest");
      whoami = `node ${short(checkpoint.node_did)} · tree size ${checkpoint.size}`;
    } else {
      // The token is checked by the integrity route; a log with nothing sealed yet has
      // no checkpoint there (404), which is no reason to refuse it.
      let size = "nothing sealed yet";
      try {
        size = "tree size " + (await api("/v1/integrity")).checkpoint.size;
      } catch (error) {
        // A partition set and no partition named: the token was accepted (the node checks
        // it first); SQL reads every partition, the one-log pages need a partition.
        if (error.code === "partition_required") size = "every partition";
        else if (error.status !== 404) throw error;
      }
      whoami = `query node${partition ? " · partition " + partition : ""} · ${size}`;
    }
    sessionStorage.setItem("custos-token", token);
    if (partition) sessionStorage.setItem("custos-partition", partition);
    $("#signin-view").hidden = true;
    $("#nav").hidden = false;
    $("#whoami").textContent = whoami;
    live();
    await show();
  } catch (error) {
    signOut(error.message);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#signin").addEventListener("submit", (event) => { event.preventDefault(); signIn($("#token").value.trim(), $("#partition").value); });
  $("#signout").addEventListener("click", () => signOut());
  $("#events-form").addEventListener("submit", (event) => { event.preventDefault(); searchEvents(false); });
  $("#events-more").addEventListener("click", () => searchEvents(true));
  $("#sql-form").addEventListener("submit", (event) => { event.preventDefault(); runSql(); });
  $("#verify-now").addEventListener("click", async () => {
    $("#integrity-error").textContent = "verifying…";
    try {
      await api("/v1/integrity/verify", { method: "POST" });
      $("#integrity-error").textContent = "";
      await views.integrity();
    } catch (error) {
      $("#integrity-error").textContent = error.message;
    }
  });
  window.addEventListener("hashchange", show);
  if (token) signIn(token, partition); else signOut();
});
