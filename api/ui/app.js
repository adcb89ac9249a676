// The operator's page: draws GET /v1/topology/live and polls it; jobs, dead letters, try it.
// Plain browser JavaScript, no library, no build step. Each panel is one entry of PANELS
// (a <section data-panel="NAME"> in page.html): another panel is one more entry.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const NODE_W = 180;
const NODE_H = 66;
const POLL_MS = Number(document.body.dataset.pollMs) || 1500;

function apiKey() {
  return sessionStorage.getItem("toposerve-api-key") || "";
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (apiKey()) headers["X-API-Key"] = apiKey();
  const response = await fetch(path, Object.assign({}, options, { headers }));
  let body = null;
  const text = await response.text();
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = { raw: text }; }
  return { status: response.status, ok: response.ok, body, headers: response.headers };
}

function errorText(result) {
  const error = result.body && result.body.error;
  return error ? `${result.status} ${error.code}: ${error.message}` : `HTTP ${result.status}`;
}

function el(tag, attrs = {}, text = null) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  return node;
}

function fmt(value, digits = 1) {
  if (value === null || value === undefined) return "–";
  return Number.isInteger(value) ? String(value) : Number(value).toFixed(digits);
}

// ------------------------------------------------------------------ topology

const topology = { drawn: null, nodes: {} };

function drawGraph(graph) {
  const svg = document.getElementById("graph-svg");
  svg.textContent = "";
  svg.setAttribute("width", graph.width);
  svg.setAttribute("height", graph.height);
  svg.setAttribute("viewBox", `0 0 ${graph.width} ${graph.height}`);
  const at = {};
  for (const node of graph.nodes) at[node.id] = node;
  const edges = el("svg:g", { class: "edges" });
  for (const edge of graph.edges) {
    const a = at[edge.source], b = at[edge.target];
    if (!a || !b) continue;
    const forward = b.x > a.x;
    const x1 = forward ? a.x + NODE_W : a.x, y1 = a.y + NODE_H / 2;
    const x2 = forward ? b.x : b.x + NODE_W, y2 = b.y + NODE_H / 2;
    const bend = forward ? 40 : -60;
    const path = el("svg:path", {
      class: `edge ${edge.kind}`, "data-edge": `${edge.source}>${edge.target}`,
      d: `M${x1},${y1} C${x1 + bend},${y1} ${x2 - bend},${y2} ${x2},${y2}`,
    });
    path.appendChild(el("svg:title", {}, `${edge.kind}${edge.keys.length ? ": " + edge.keys.join(", ") : ""}`));
    edges.appendChild(path);
  }
  svg.appendChild(edges);
  topology.nodes = {};
  for (const node of graph.nodes) {
    const g = el("svg:g", { class: `node ${node.kind}`, "data-node": node.id, transform: `translate(${node.x},${node.y})` });
    g.appendChild(el("svg:rect", { width: NODE_W, height: NODE_H }));
    // A queue's name is {namespace}.{profile}.{stage}: its last word tells them apart (the title has it all).
    const short = node.kind === "queue" ? `queue ${node.label.split(".").pop()}` : node.label;
    const label = short.length > 28 ? "…" + short.slice(-27) : short;
    g.appendChild(el("svg:text", { x: 8, y: 15, class: "title" }, label));
    g.appendChild(el("svg:title", {}, `${node.kind} ${node.label}${node.detail ? " · " + node.detail : ""}`));
    const lines = [];
    for (let i = 0; i < 3; i++) {
      const line = el("svg:text", { x: 8, y: 31 + i * 14, "data-line": i }, i === 0 ? node.detail : "");
      g.appendChild(line);
      lines.push(line);
    }
    svg.appendChild(g);
    topology.nodes[node.id] = { g, lines, node };
  }
  topology.drawn = graph.profile;
}

function setLines(id, lines) {
  const entry = topology.nodes[id];
  if (!entry) return;
  lines.forEach((text, i) => { if (entry.lines[i]) entry.lines[i].textContent = text; });
}

function renderFigures(view) {
  const flagged = new Set(view.flagged);
  for (const [id, entry] of Object.entries(topology.nodes)) {
    entry.g.classList.toggle("flagged", flagged.has(id));
    entry.g.classList.remove("down");
  }
  setLines("ingress", [`${view.graph.mode} · ${fmt(view.ingress.requests_per_s)} req/s`,
                       `in flight ${view.ingress.in_flight} · shed ${view.ingress.shed}`,
                       view.broker_error ? "broker: " + view.broker_error.slice(0, 24) : ""]);
  const tbody = document.querySelector("#stage-table tbody");
  tbody.textContent = "";
  for (const [name, s] of Object.entries(view.stages)) {
    const q = view.queues[s.queue] || {};
    setLines(`queue:${s.queue}`, [`depth ${fmt(q.depth)} · unacked ${fmt(s.unacked ?? s.in_flight)}`,
                                  `consumers ${fmt(q.consumers)}`,
                                  `in ${fmt(s.in_per_s)}/s`]);
    const down = s.flags.includes("no_consumer");
    setLines(`stage:${name}`, [down ? "DOWN: no consumer" : `${fmt(s.in_per_s)}/s in · ${fmt(s.out_per_s)}/s out`,
                               `p50 ${fmt(s.p50_ms)} · p99 ${fmt(s.p99_ms)} ms` +
                                 (s.batch_size_mean !== null ? ` · batch ${fmt(s.batch_size_mean)}` : ""),
                               `replicas ${s.replicas_reporting}/${s.replicas} · fail ${fmt(s.failed_per_s)}/s` +
                                 ` · dl ${fmt(s.dead_lettered_per_s)}/s`]);
    const entry = topology.nodes[`stage:${name}`];
    if (entry) {
      entry.g.classList.toggle("down", down);
      entry.lines[0].classList.toggle("down-label", down);
    }
    for (const edge of document.querySelectorAll(`path[data-edge="queue:${s.queue}>stage:${name}"]`)) {
      edge.classList.toggle("active", s.out_per_s > 0);
    }
    const row = el("tr", { "data-stage": name, class: s.flags.length ? "flagged" : "" });
    const cells = [name, fmt(s.depth), fmt(s.consumers), `${s.replicas_reporting}/${s.replicas}`,
                   fmt(s.unacked ?? s.in_flight), fmt(s.in_per_s), fmt(s.out_per_s), fmt(s.p50_ms), fmt(s.p99_ms),
                   fmt(s.batch_size_mean), fmt(s.failed_per_s), fmt(s.dead_lettered_per_s), s.flags.join(" ")];
    const keys = ["stage", "depth", "consumers", "replicas", "unacked", "in", "out", "p50", "p99", "batch", "failed",
                  "dead", "flags"];
    cells.forEach((text, i) => row.appendChild(el("td", { "data-figure": keys[i] }, text)));
    tbody.appendChild(row);
  }
  for (const [id, store] of Object.entries(view.stores)) {
    if (store.hit_ratio !== null || store.hits_per_s !== null) {
      setLines(id, ["Redis", `hit ratio ${store.hit_ratio === null ? "–" : (store.hit_ratio * 100).toFixed(0) + "%"}`,
                    `${fmt(store.hits_per_s)} hits/s · ${fmt(store.misses_per_s)} misses/s`]);
    }
  }
  const deadId = Object.keys(topology.nodes).find((id) => id.startsWith("dead:"));
  if (deadId) setLines(deadId, ["dead letters", `depth ${fmt(view.dead_letters.depth)}`, ""]);
  const status = document.getElementById("topology-status");
  status.textContent = `${view.source} · window ${fmt(view.window_s)} s · ${new Date(view.at * 1000).toLocaleTimeString()}` +
    (view.redis_error ? ` · redis: ${view.redis_error}` : "");
}

async function pollTopology() {
  try {
    const result = await api("/v1/topology/live");
    if (!result.ok) {
      document.getElementById("topology-status").textContent = errorText(result);
    } else {
      if (topology.drawn !== result.body.graph.profile) drawGraph(result.body.graph);
      renderFigures(result.body);
    }
  } catch (e) {
    document.getElementById("topology-status").textContent = `unreachable (${e})`;
  }
  setTimeout(pollTopology, POLL_MS);
}

// ------------------------------------------------------------------ jobs

function showPath(target, record) {
  // The job's path: the stages it went through, in the order their timings were recorded.
  const path = el("div", { class: "path" });
  path.appendChild(el("span", {}, "ingress"));
  for (const [name, ms] of Object.entries(record.timings || {})) {
    if (name === "total_ms") continue;
    path.appendChild(el("span", { "data-hop": name.replace(/_ms$/, "") }, `${name.replace(/_ms$/, "")} ${fmt(ms, 2)} ms`));
  }
  if (record.timings && record.timings.total_ms !== undefined) {
    path.appendChild(el("span", {}, `total ${fmt(record.timings.total_ms, 2)} ms`));
  }
  target.appendChild(path);
}

function showJob(target, record) {
  target.textContent = "";
  const summary = `job ${record.id} · ${record.model} · ${record.status}` +
    (record.trace_id ? ` · trace ${record.trace_id}` : "");
  target.appendChild(el("div", { class: "summary" }, summary));
  showPath(target, record);
  if (record.predictions) {
    const labels = record.predictions.map((p) => p.label).join(", ");
    target.appendChild(el("div", { "data-answer": "labels" }, `labels: ${labels}`));
  }
  if (record.error) target.appendChild(el("div", { class: "error" }, `${record.error.code}: ${record.error.message}`));
  target.appendChild(el("details", {}, null)).appendChild(el("pre", {}, JSON.stringify(record, null, 2)));
}

async function findJob(event) {
  event.preventDefault();
  const target = document.getElementById("job-result");
  const id = document.getElementById("job-id").value.trim();
  const result = await api(`/v1/jobs/${encodeURIComponent(id)}`);
  if (result.status === 200 || result.status === 202) showJob(target, result.body);
  else target.textContent = errorText(result);
}

// ------------------------------------------------------------------ batches

// A listing panel's table emptied, and its answer; null (the error shown in its status) when refused.
async function fetchListing(path, tableId, statusId) {
  const result = await api(path);
  const tbody = document.querySelector(`#${tableId} tbody`);
  const status = document.getElementById(statusId);
  tbody.textContent = "";
  if (!result.ok) { status.textContent = errorText(result); return null; }
  return { body: result.body, tbody, status };
}

async function loadBatches() {
  const listing = await fetchListing("/v1/batches?limit=50", "batch-table", "batch-status");
  if (!listing) return;
  const { body, tbody, status } = listing;
  status.textContent = `${body.batches.length} of ${body.total}`;
  for (const batch of body.batches) {
    const row = el("tr", { "data-batch": batch.id, "data-state": batch.state });
    const finished = batch.done + batch.failed;
    const bar = el("progress", { max: batch.total, value: Math.min(finished, batch.total) });
    const cells = [batch.id, batch.model, batch.state, null, `${batch.done} done · ${batch.failed} failed / ${batch.total}`,
                   `${batch.chunks_done}/${batch.chunks}`, new Date(batch.created * 1000).toLocaleString(),
                   batch.owner || "–"];
    for (const text of cells) {
      const cell = el("td", {}, text);
      if (text === null) cell.appendChild(bar);
      row.appendChild(cell);
    }
    const actions = el("td");
    const button = el("button", { type: "button", "data-action": "cancel" }, "cancel");
    button.disabled = batch.state !== "running";  // the server decides who may (owner or operator key)
    button.addEventListener("click", () => cancelBatch(batch.id));
    actions.appendChild(button);
    row.appendChild(actions);
    tbody.appendChild(row);
  }
}

async function cancelBatch(id) {
  const target = document.getElementById("batch-result");
  const result = await api(`/v1/batches/${encodeURIComponent(id)}/cancel`, { method: "POST" });
  target.textContent = result.ok ? `cancelled ${id}` : errorText(result);
  target.dataset.lastAction = `cancel:${id}:${result.status}`;
  await loadBatches();
}

async function pollBatches() {
  try { await loadBatches(); } catch (e) { document.getElementById("batch-status").textContent = `unreachable (${e})`; }
  setTimeout(pollBatches, POLL_MS * 2);
}

// ------------------------------------------------------------------ dead letters

async function loadDeadLetters() {
  const listing = await fetchListing("/v1/dead-letters?limit=100", "dead-table", "dead-status");
  if (!listing) return;
  const { body, tbody, status } = listing;
  status.textContent = `${body.letters.length} of ${body.total}` +
    (body.may_act ? "" : " · read-only (not an operator key)");
  for (const letter of body.letters) {
    const id = letter.job_id || letter.message_id;
    const row = el("tr", { "data-dead": id || "" });
    for (const text of [letter.job_id || "–", letter.routing_key, letter.stage || "–", fmt(letter.attempts), letter.reason]) {
      row.appendChild(el("td", {}, text));
    }
    const actions = el("td");
    for (const action of ["replay", "discard"]) {
      const button = el("button", { type: "button", "data-action": action }, action);
      button.disabled = !body.may_act || !id;
      button.addEventListener("click", () => actOnDeadLetter(action, id));
      actions.appendChild(button);
    }
    row.appendChild(actions);
    tbody.appendChild(row);
  }
}

async function actOnDeadLetter(action, id) {
  const target = document.getElementById("dead-result");
  const result = await api(`/v1/dead-letters/${action}`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ ids: [id] }),
  });
  if (!result.ok) { target.textContent = errorText(result); return; }
  const done = result.body.done.length ? `${action}ed ${result.body.done.join(", ")}` : "";
  const refused = result.body.refused.map((r) => `refused ${r.id}: ${r.why}`).join("; ");
  const missing = result.body.not_found.length ? `not found ${result.body.not_found.join(", ")}` : "";
  target.textContent = [done, refused, missing].filter(Boolean).join(" · ");
  target.dataset.lastAction = `${action}:${id}`;
  await loadDeadLetters();
}

// ------------------------------------------------------------------ model versions

async function loadVersions() {
  const tbody = document.querySelector("#versions-table tbody");
  const status = document.getElementById("versions-status");
  const listed = await api("/v1/models");
  if (!listed.ok) { status.textContent = errorText(listed); return; }
  const rows = [];
  for (const model of listed.body.models || listed.body.data || []) {
    const name = typeof model === "string" ? model : model.name;
    const versions = await api(`/v1/models/${encodeURIComponent(name)}/versions`);
    if (!versions.ok || (!versions.body.canary && !versions.body.shadow)) continue;
    const v = versions.body;
    const canary = v.canary ? `v${v.canary.version} · ${v.canary.percent} %` : "–";
    let shadow = null;
    if (v.shadow) {
      const report = await api(`/v1/models/${encodeURIComponent(name)}/shadow`);
      shadow = report.ok ? report.body : null;
    }
    const agreement = shadow && shadow.agreement_rate !== null ? `${fmt(shadow.agreement_rate * 100)} %` : "–";
    // Labels of each version (the inputs of a digits image are 64 numbers: too long for a cell).
    const sample = shadow ? shadow.disagreements.slice(0, 3)
      .map((d) => `${d.serve_labels.join(",")} ≠ ${d.shadow_labels.join(",")}`).join("; ") : "";
    rows.push({ name, cells: [name, `v${v.serving}`, canary, v.shadow ? `v${v.shadow}` : "–",
      shadow ? fmt(shadow.jobs) : "–", agreement, shadow ? fmt(shadow.latency.serve_ms, 2) : "–",
      shadow ? fmt(shadow.latency.shadow_ms, 2) : "–", sample] });
  }
  tbody.textContent = "";
  for (const row of rows) {
    const tr = el("tr", { "data-model": row.name });
    for (const text of row.cells) tr.appendChild(el("td", {}, text));
    tbody.appendChild(tr);
  }
  status.textContent = rows.length ? "" : "no model of this profile has a canary or a shadow";
}

function pollVersions() {
  loadVersions().finally(() => setTimeout(pollVersions, Math.max(POLL_MS, 2000)));
}

// ------------------------------------------------------------------ try it

async function loadModels() {
  const result = await api("/v1/models");
  const select = document.getElementById("try-model");
  select.textContent = "";
  if (!result.ok) return;
  const models = result.body.models || result.body.data || [];
  for (const model of models) {
    const name = typeof model === "string" ? model : model.name;
    select.appendChild(el("option", { value: name }, name));
  }
}

function fileAsBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function tryIt(event) {
  event.preventDefault();
  const target = document.getElementById("try-result");
  target.textContent = "sending…";
  const model = document.getElementById("try-model").value;
  const file = document.getElementById("try-image").files[0];
  let body;
  try {
    body = file ? { image: await fileAsBase64(file) } : { instances: JSON.parse(document.getElementById("try-rows").value) };
  } catch (e) {
    target.textContent = `rows are not valid JSON: ${e.message}`;
    return;
  }
  let result = await api(`/v1/models/${encodeURIComponent(model)}/predict`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  if (result.status === 202 && result.body && result.body.id) {  // async: wait for the job, as curl's ?wait= does
    target.textContent = `accepted job ${result.body.id}; waiting…`;
    result = await api(`/v1/jobs/${result.body.id}?wait=10`);
  }
  if (result.ok && result.body && result.body.id) {
    showJob(target, result.body);
    if (result.headers.get("x-cache")) target.appendChild(el("div", {}, `cache: ${result.headers.get("x-cache")}`));
  } else if (result.ok) {
    target.textContent = JSON.stringify(result.body, null, 2);
  } else {
    target.textContent = errorText(result);
  }
}

// ------------------------------------------------------------------ panels

const PANELS = {
  "topology": () => pollTopology(),
  "jobs": () => document.getElementById("job-form").addEventListener("submit", findJob),
  "batches": () => {
    document.getElementById("batch-refresh").addEventListener("click", loadBatches);
    pollBatches();
  },
  "dead-letters": () => {
    document.getElementById("dead-refresh").addEventListener("click", loadDeadLetters);
    loadDeadLetters();
  },
  "versions": () => pollVersions(),
  "try-it": () => {
    document.getElementById("try-form").addEventListener("submit", tryIt);
    loadModels();
  },
};

function start() {
  const key = document.getElementById("api-key");
  key.value = apiKey();
  key.addEventListener("change", () => {
    sessionStorage.setItem("toposerve-api-key", key.value);
    loadDeadLetters();
    loadBatches();
    loadModels();
  });
  for (const section of document.querySelectorAll("section[data-panel]")) {
    const init = PANELS[section.dataset.panel];
    if (init) init();
  }
}

start();
