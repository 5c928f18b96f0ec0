// The mesh graph: polls /api/graph every 2 s and draws it as SVG; an edge's click shows its
// `ambientctl explain` (from /api/explain). Plain JS, no libraries: the page works offline.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const POLL_MS = 2000;
const COL_W = 300, ROW_H = 56, NODE_W = 150, NODE_H = 34, PAD = 30, BAND_GAP = 18;
const BASE_RANK = { external: 0, workload: 0, waypoint: 1, service: 2 };
let selected = null;

function el(name, attrs, parent) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (parent) parent.appendChild(e);
  return e;
}

function fmt(x) {
  return x >= 10 ? x.toFixed(0) : x >= 1 ? x.toFixed(1) : x.toFixed(2);
}

// Columns by position on the path (clients, waypoints, services, servers), at most a few
// passes so that a cycle (a server that is also a client) cannot loop.
function ranks(nodes, edges) {
  const rank = {};
  for (const n of nodes) rank[n.id] = BASE_RANK[n.kind] || 0;
  for (let pass = 0; pass < 6; pass++) {
    let moved = false;
    for (const e of edges) {
      if (rank[e.source] === undefined || rank[e.target] === undefined) continue;
      if (rank[e.target] < rank[e.source] + 1 && rank[e.source] + 1 < 8) {
        rank[e.target] = rank[e.source] + 1;
        moved = true;
      }
    }
    if (!moved) break;
  }
  return rank;
}

function layout(nodes, edges) {
  const rank = ranks(nodes, edges);
  const bands = new Map();
  for (const n of nodes) {
    const ns = n.namespace || "(outside the mesh)";
    if (!bands.has(ns)) bands.set(ns, []);
    bands.get(ns).push(n);
  }
  const pos = {}, boxes = [];
  let y = PAD;
  for (const ns of [...bands.keys()].sort()) {
    const perRank = {};
    for (const n of bands.get(ns)) (perRank[rank[n.id]] = perRank[rank[n.id]] || []).push(n);
    const rows = Math.max(...Object.values(perRank).map((l) => l.length));
    for (const [r, list] of Object.entries(perRank)) {
      list.forEach((n, i) => {
        pos[n.id] = { x: PAD + 20 + Number(r) * COL_W, y: y + 28 + i * ROW_H };
      });
    }
    const h = 28 + rows * ROW_H + 24;  // room below for edges that bow under a row
    boxes.push({ ns, y, h });
    y += h + BAND_GAP;
  }
  const maxRank = Math.max(0, ...Object.values(rank));
  return { pos, boxes, width: PAD * 2 + 40 + (maxRank + 1) * COL_W, height: y + PAD };
}

function edgeLabel(e) {
  const parts = [];
  if (e.req_rate > 0 || e.requests > 0) parts.push(`${fmt(e.req_rate)} req/s`);
  parts.push(`${fmt(e.conn_rate)} conn/s`);
  if (e.error_rate > 0) parts.push(`${(e.error_rate * 100).toFixed(0)}% err`);
  if (e.denied > 0) parts.push(`${e.denied} denied`);
  return parts.join(" · ");
}

function drawNode(n, p, g) {
  const node = el("g", {
    class: `node ${n.kind}`, "data-id": n.id, "data-kind": n.kind,
    "data-namespace": n.namespace, "data-state": n.state || "", transform: `translate(${p.x},${p.y})`,
  }, g);
  const title = el("title", {}, node);
  if (n.kind === "service") {
    el("polygon", { points: `0,${NODE_H / 2} 14,0 ${NODE_W - 14},0 ${NODE_W},${NODE_H / 2} ${NODE_W - 14},${NODE_H} 14,${NODE_H}` }, node);
    title.textContent = `service ${n.namespace}/${n.name} ${n.vip || ""}` + (n.waypoint ? ` (waypoint ${n.waypoint})` : "");
  } else if (n.kind === "external") {
    el("circle", { cx: NODE_W / 2, cy: NODE_H / 2, r: NODE_H / 2 }, node);
    title.textContent = "clients the tunnels could not name (outside the mesh)";
  } else {
    el("rect", { width: NODE_W, height: NODE_H, rx: n.kind === "waypoint" ? 12 : 4 }, node);
    const pods = (n.pods || []).map((p) => `${p.name} on ${p.node}: ${p.state}${p.reason ? " (" + p.reason + ")" : ""}`);
    title.textContent = `${n.kind} ${n.namespace}/${n.name}: ${n.state}` + (n.reason ? ` (${n.reason})` : "") + (pods.length ? "\n" + pods.join("\n") : "");
  }
  const label = el("text", { x: NODE_W / 2, y: 14, "text-anchor": "middle" }, node);
  label.textContent = n.name;
  const sub = el("text", { x: NODE_W / 2, y: 28, "text-anchor": "middle", class: "sub" }, node);
  sub.textContent = n.kind === "workload" ? `${(n.pods || []).length} pod(s) · ${n.state}` : n.kind === "waypoint" ? `waypoint · ${n.state}` : n.kind;
}

function drawEdge(e, pos, g) {
  const a = pos[e.source], b = pos[e.target];
  if (!a || !b) return;
  const idle = e.conn_rate === 0 && e.req_rate === 0 && e.active === 0;
  const group = el("g", {
    class: "edge" + (idle ? " idle" : "") + (selected === e.id ? " selected" : ""),
    "data-id": e.id, "data-source": e.source, "data-target": e.target,
    "data-security": e.security, "data-denied": e.denied > 0 ? "true" : "false",
    "data-denied-total": e.denied, "data-deny-rate": e.deny_rate,
    "data-connections": e.connections, "data-conn-rate": e.conn_rate,
    "data-requests": e.requests, "data-req-rate": e.req_rate, "data-error-rate": e.error_rate,
  }, g);
  const x1 = a.x + NODE_W, y1 = a.y + NODE_H / 2, x2 = b.x, y2 = b.y + NODE_H / 2;
  const bend = x2 > x1 ? (x2 - x1) / 2 : 120;
  // An edge that skips a column bows below the row, clear of the nodes it passes.
  const skip = Math.round((x2 - x1 - (COL_W - NODE_W)) / COL_W);
  const sag = skip > 0 ? ROW_H * 0.9 * skip : 0;
  const c1 = [x1 + bend, y1 + sag], c2 = [x2 - bend, y2 + sag];
  el("path", { d: `M${x1},${y1} C${c1[0]},${c1[1]} ${c2[0]},${c2[1]} ${x2},${y2}`, "marker-end": "url(#arrow)" }, group);
  // The label at the curve's middle (t = 1/2 of the cubic Bezier), just above it.
  const mx = (x1 + 3 * c1[0] + 3 * c2[0] + x2) / 8, my = (y1 + 3 * c1[1] + 3 * c2[1] + y2) / 8;
  const t = el("text", { x: mx, y: my - 6, "text-anchor": "middle" }, group);
  t.textContent = edgeLabel(e);
  el("title", {}, group).textContent = `${e.source} → ${e.target} (${e.security})\nclick for explain`;
  group.addEventListener("click", () => explain(e));
}

function draw(doc) {
  const svg = document.getElementById("graph");
  const { pos, boxes, width, height } = layout(doc.nodes, doc.edges);
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("preserveAspectRatio", "xMinYMin meet");
  const defs = el("defs", {}, svg);
  const marker = el("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 12, markerHeight: 12, markerUnits: "userSpaceOnUse", orient: "auto-start-reverse" }, defs);
  el("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#555" }, marker);
  const nsLayer = el("g", { class: "namespaces" }, svg);
  for (const b of boxes) {
    el("rect", { class: "ns-box", x: PAD / 2, y: b.y, width: width - PAD, height: b.h, rx: 8, "data-namespace": b.ns }, nsLayer);
    el("text", { class: "ns-label", x: PAD, y: b.y + 16 }, nsLayer).textContent = `namespace ${b.ns}`;
  }
  const edgeLayer = el("g", { class: "edges" }, svg);
  for (const e of doc.edges) drawEdge(e, pos, edgeLayer);
  const nodeLayer = el("g", { class: "nodes" }, svg);
  for (const n of doc.nodes) if (pos[n.id]) drawNode(n, pos[n.id], nodeLayer);
  const errors = document.getElementById("errors");
  errors.replaceChildren(...(doc.errors || []).map((m) => {
    const li = document.createElement("li");
    li.textContent = m;
    return li;
  }));
  if (selected) {
    const e = doc.edges.find((x) => x.id === selected);
    if (e) figures(e);
  }
}

function figures(e) {
  const box = document.getElementById("panel-figures");
  box.textContent = `${e.security === "mtls" ? "mTLS (HBONE)" : e.security} · ` +
    `${fmt(e.conn_rate)} conn/s (${e.connections} total, ${e.active} open) · ` +
    `${fmt(e.req_rate)} req/s (${e.requests} total, ${(e.error_rate * 100).toFixed(0)}% errors) · ` +
    `${e.denied} denied (${fmt(e.deny_rate)}/s)` + (e.services.length ? ` · services ${e.services.join(", ")}` : "");
}

async function explain(e) {
  selected = e.id;
  document.getElementById("panel-title").textContent = `${e.source} → ${e.target}`;
  figures(e);
  const pre = document.getElementById("explain");
  if (!e.explain) {
    pre.textContent = "no explain for this edge (its source is not a pod of the cluster)";
    return;
  }
  pre.textContent = "asking the tunnel…";
  try {
    const r = await fetch(`/api/explain?edge=${encodeURIComponent(e.id)}`);
    const doc = await r.json();
    pre.textContent = doc.error ? `explain failed: ${doc.error}` : `$ ${doc.command}\n\n${doc.text}`;
  } catch (err) {
    pre.textContent = `explain failed: ${err}`;
  }
}

async function poll() {
  const status = document.getElementById("status");
  try {
    const r = await fetch("/api/graph", { cache: "no-store" });
    const doc = await r.json();
    draw(doc);
    document.body.dataset.updated = String(doc.time || "");
    status.textContent = `${doc.nodes.length} nodes, ${doc.edges.length} edges · rates over ${fmt(doc.interval || 0)} s · ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    status.textContent = `cannot reach the dashboard server: ${err}`;
  }
  setTimeout(poll, POLL_MS);
}

poll();
