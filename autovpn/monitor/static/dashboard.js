// The autovpn dashboard: polls GET /status once a second and redraws. No libraries, no build
// step, nothing fetched from anywhere but this engine's own control API.
"use strict";

const POLL_MS = 1000;
const HISTORY = 120; // graph points: two minutes at one a second
const token = document.querySelector('meta[name="autovpn-page-token"]').content;
const history = []; // [{t, up, down}] bytes per second
let last = null; // {t, up, down} cumulative bytes of the previous answer

function human(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text; // text only: names come from the network, never HTML
  if (cls) td.className = cls;
  return td;
}

function fill(id, rows) {
  const body = document.querySelector("#" + id + " tbody");
  const fresh = document.createElement("tbody");
  for (const cells of rows) {
    const tr = document.createElement("tr");
    for (const c of cells) tr.appendChild(Array.isArray(c) ? cell(c[0], c[1]) : cell(String(c)));
    fresh.appendChild(tr);
  }
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    const td = cell("none");
    td.colSpan = 8;
    td.className = "muted";
    tr.appendChild(td);
    fresh.appendChild(tr);
  }
  body.replaceWith(fresh);
}

function failures(f) {
  const parts = Object.entries(f || {}).map(([k, v]) => k + " " + v);
  return parts.length ? [parts.join(", "), "bad"] : "-";
}

function totals(routes) {
  let up = 0, down = 0;
  for (const r of Object.values(routes || {})) { up += r.bytes_up; down += r.bytes_down; }
  return { up, down };
}

function drawGraph() {
  const canvas = document.getElementById("graph");
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = w * ratio; canvas.height = h * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.clearRect(0, 0, w, h);
  const max = Math.max(1024, ...history.map(p => Math.max(p.up, p.down)));
  g.strokeStyle = "#e1e5ea"; g.fillStyle = "#6a7480"; g.font = "11px sans-serif";
  for (let i = 0; i <= 4; i++) {
    const y = 4 + (h - 8) * i / 4;
    g.beginPath(); g.moveTo(0, y); g.lineTo(w, y); g.stroke();
    g.fillText(human(max * (4 - i) / 4) + "/s", 4, y + 12 > h ? y - 2 : y + 12);
  }
  for (const [key, color] of [["up", "#2f7ed8"], ["down", "#1aa179"]]) {
    g.strokeStyle = color; g.lineWidth = 2; g.beginPath();
    history.forEach((p, i) => {
      const x = w - (history.length - 1 - i) * (w / (HISTORY - 1));
      const y = h - 4 - (h - 8) * p[key] / max;
      if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
    });
    g.stroke();
  }
}

function render(st) {
  document.getElementById("version").textContent = st.version;
  const stats = st.stats;
  for (const b of document.querySelectorAll(".modes button")) {
    b.classList.toggle("active", b.dataset.mode === st.mode);
  }
  const up = st.tunnel ? (st.tunnel.up ? "tunnel up" : "tunnel DOWN") : "no tunnel client";
  document.getElementById("summary").textContent =
    "mode " + st.mode + " · " + up + " · " +
    (stats ? stats.open + " open connections" : "statistics off");
  const base = location.origin;
  const pac = document.getElementById("pac");
  if (!pac.childElementCount) {
    for (const name of ["proxy", "global", "smart", "direct"]) {
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.href = base + "/" + name + ".pac"; a.textContent = a.href;
      li.appendChild(a);
      li.appendChild(document.createTextNode(name === "proxy" ? "  (follows the mode)" : ""));
      pac.appendChild(li);
    }
  }
  if (!stats) return;
  const now = Date.now() / 1000;
  const sum = totals(stats.routes);
  if (last) {
    const dt = Math.max(now - last.t, 0.001);
    history.push({ up: Math.max(sum.up - last.up, 0) / dt, down: Math.max(sum.down - last.down, 0) / dt });
    if (history.length > HISTORY) history.shift();
    const p = history[history.length - 1];
    document.getElementById("rates").textContent =
      "up " + human(p.up) + "/s · down " + human(p.down) + "/s · total up " + human(sum.up) +
      ", down " + human(sum.down);
  }
  last = { t: now, up: sum.up, down: sum.down };
  drawGraph();

  const live = {}; // the pool's servers as they are now, by URL
  for (const s of (st.tunnel && st.tunnel.servers) || []) live[s.url] = s;
  const servers = new Set([...Object.keys(stats.servers || {}), ...Object.keys(stats.health || {}),
                           ...Object.keys(live)]);
  fill("servers", [...servers].sort().map(name => {
    const h = (stats.health || {})[name] || [];
    const s = h.length ? h[h.length - 1] : {};
    let state = s.state || "?", rtt = s.rtt_ms;
    if (live[name]) {
      state = live[name].state;
      const rtts = live[name].connections.map(c => c.rtt_ms).filter(x => x !== null);
      if (rtts.length) rtt = Math.min(...rtts);
    }
    const g = (stats.servers || {})[name] || { open: 0, total: 0 };
    return [name, [state, state === "up" ? "ok" : "bad"],
            rtt == null ? "-" : rtt.toFixed(1) + " ms",
            s.loss == null ? "-" : (s.loss * 100).toFixed(0) + "%",
            g.open + " open / " + g.total];
  }));
  fill("routes", Object.entries(stats.routes || {}).map(([name, r]) =>
    [name, r.open, r.total, [human(r.bytes_up), "num"], [human(r.bytes_down), "num"],
     failures(r.failures)]));
  document.getElementById("open-count").textContent = "(" + stats.open + " open)";
  fill("connections", (stats.connections || []).map(c =>
    [c.host + ":" + c.port, c.route || "user " + c.user, [c.rule, "rule"], c.server || "-",
     [human(c.bytes_up), "num"], [human(c.bytes_down), "num"], [c.seconds.toFixed(0), "num"]]));
  fill("domains", Object.entries(stats.domains || {}).slice(0, 10).map(([name, d]) =>
    [name, d.open + " open / " + d.total, [human(d.bytes_up + d.bytes_down), "num"]]));
  fill("failures", (stats.recent_failures || []).slice(-10).reverse().map(f =>
    [new Date(f.time * 1000).toLocaleTimeString(), f.target, [f.reason, "bad"]]));
}

async function poll() {
  try {
    const r = await fetch("/status", { cache: "no-store" });
    if (r.ok) render(await r.json());
    else document.getElementById("summary").textContent = "the engine answered " + r.status;
  } catch (e) {
    document.getElementById("summary").textContent = "the engine does not answer";
  }
}

async function setMode(mode) {
  const err = document.getElementById("mode-error");
  err.hidden = true;
  const r = await fetch("/mode", {
    method: "POST",
    headers: { "Authorization": "Bearer " + token, "Content-Type": "application/json" },
    body: JSON.stringify({ mode }),
  });
  if (!r.ok) {
    err.textContent = "mode switch refused: " + ((await r.json()).error || r.status);
    err.hidden = false;
  }
  await poll();
}

for (const b of document.querySelectorAll(".modes button")) {
  b.addEventListener("click", () => setMode(b.dataset.mode));
}
poll();
setInterval(poll, POLL_MS);
