// The console's behaviour: actions through the REST API (session cookie + CSRF header),
// live regions refreshed by polling the page itself, and charts drawn by the vendored Chart.js.
"use strict";

const POLL_MS = 2000;
const CHART_POLL_MS = 10000;

const csrf = () => document.querySelector('meta[name="csrf-token"]').content;

function toLogin() {
  window.location = "/ui/login?next=" + encodeURIComponent(location.pathname + location.search);
}

// A REST call as the console's session; a refusal becomes an Error carrying the API's own words.
async function api(method, path, body) {
  const headers = { "X-CSRF-Token": csrf() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (res.status === 401) { toLogin(); throw new Error("401: the session ended; log in again"); }
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = { detail: text }; }
  if (!res.ok) { throw new Error(`${res.status}: ${describe(data && data.detail)}`); }
  return data;
}

// FastAPI's 422 detail is a list of {loc, msg}; everything else here is a sentence.
function describe(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => (d && d.msg ? `${(d.loc || []).slice(1).join(".")}: ${d.msg}` : JSON.stringify(d)))
      .join("; ");
  }
  return JSON.stringify(detail);
}

function showError(slot, err) {
  if (slot) slot.textContent = err ? err.message : "";
}

function localTimes(root) {
  root.querySelectorAll("time[data-ts]").forEach((t) => {
    const ts = parseFloat(t.dataset.ts);
    if (ts) { t.title = t.textContent; t.textContent = new Date(ts * 1000).toLocaleString(); }
  });
}

// -- live regions: the page polls itself and swaps in every [data-live] element by id -----------

let polling = false;

async function refreshLive() {
  const res = await fetch(location.href, { credentials: "same-origin" });
  if (res.redirected && new URL(res.url).pathname === "/ui/login") { window.location = res.url; return; }
  if (!res.ok) return;
  const fresh = new DOMParser().parseFromString(await res.text(), "text/html");
  document.querySelectorAll("[data-live][id]").forEach((region) => {
    const next = fresh.getElementById(region.id);
    if (!next) return;
    region.innerHTML = next.innerHTML;
    for (const [k, v] of Object.entries(next.dataset)) region.dataset[k] = v;
    localTimes(region);
  });
  document.dispatchEvent(new CustomEvent("console:refreshed"));
}

function setupLive() {
  if (!document.querySelector("[data-live]")) return;
  const tick = async () => {
    if (!document.hidden && !polling) {
      polling = true;
      try { await refreshLive(); } catch (_) { /* the next tick tries again */ } finally { polling = false; }
    }
    setTimeout(tick, POLL_MS);
  };
  setTimeout(tick, POLL_MS);
}

// -- rollouts -----------------------------------------------------------------------------------

function listOf(text) { return text.split(",").map((s) => s.trim()).filter(Boolean); }

function rolloutBody(form) {
  const f = new FormData(form);
  const soak = parseFloat(f.get("soak") || "0") || 0;
  const waves = listOf(f.get("waves") || "").map((w) =>
    w.endsWith("%") ? { percent: parseFloat(w), soak_s: soak } : { count: parseInt(w, 10), soak_s: soak });
  const devices = listOf(f.get("devices") || "");
  const tags = listOf(f.get("tags") || "");
  const group = f.get("group") || null;
  const body = {
    model: f.get("model"), version: (f.get("version") || "").trim(),
    tenant: (f.get("tenant") || "").trim() || "default",
    target: { devices, tags, group, all: devices.length === 0 && tags.length === 0 && !group },
    manual_approval: f.get("manual_approval") === "on",
    failure_action: f.get("failure_action") || "pause",
  };
  if (waves.length) body.waves = waves;
  // datetime-local is the browser's local time; the API wants an instant with its offset.
  const startAt = f.get("start_at");
  if (startAt) body.start_at = new Date(startAt).toISOString();
  const maxErrorRate = (f.get("max_error_rate") || "").trim();
  if (maxErrorRate) body.gates = { max_error_rate: parseFloat(maxErrorRate) };
  return body;
}

function setupNewRollout() {
  const form = document.getElementById("new-rollout");
  if (!form) return;
  const slot = form.querySelector("[data-error]");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    showError(slot, null);
    const body = rolloutBody(form);
    const named = [...body.target.devices, ...body.target.tags];
    if (body.target.group) named.push(`group ${body.target.group}`);
    const where = body.target.all ? "every device" : named.join(", ");
    if (!confirm(`Roll ${body.model} ${body.version} out to ${where}?`)) return;
    try {
      const created = await api("POST", "/v1/rollouts", body);
      window.location = `/ui/rollouts/${created.id}`;
    } catch (err) { showError(slot, err); }
  });
}

// Buttons are re-rendered by the live region, so one listener on the box serves them all.
function setupRolloutActions() {
  const box = document.getElementById("rollout-actions");
  if (!box) return;
  const slot = document.getElementById("rollout-actions-error");
  box.addEventListener("click", async (ev) => {
    const button = ev.target.closest("button[data-command]");
    if (!button || button.disabled) return;
    showError(slot, null);
    if (!confirm(`${button.textContent.trim()}: rollout ${box.dataset.rollout}?`)) return;
    try {
      await api("POST", `/v1/rollouts/${box.dataset.rollout}/${button.dataset.command}`, { reason: "from the console" });
      await refreshLive();
    } catch (err) { showError(slot, err); }
  });
}

// -- charts ---------------------------------------------------------------------------------------

function lineChart(id, labels, datasets, extra) {
  const canvas = document.getElementById(id);
  if (!canvas || !window.Chart) return null;
  const existing = window.Chart.getChart(canvas);
  if (existing) {
    existing.data.labels = labels;
    existing.data.datasets = datasets;
    existing.update("none");
    return existing;
  }
  return new window.Chart(canvas, {
    type: "line",
    data: { labels, datasets },
    options: Object.assign({
      animation: false, responsive: true, maintainAspectRatio: false, spanGaps: true,
      elements: { point: { radius: 2 } }, plugins: { legend: { display: datasets.length > 1 } },
      scales: { y: { beginAtZero: true } },
    }, extra || {}),
  });
}

const clock = (ms) => new Date(ms).toLocaleTimeString();

function every(ms, refresh) {
  const tick = async () => {
    if (!document.hidden) { try { await refresh(); } catch (_) { /* shown by refresh itself */ } }
    setTimeout(tick, ms);
  };
  setTimeout(tick, ms);
}

async function drawTelemetry(box) {
  const rows = (await api("GET", `/v1/devices/${encodeURIComponent(box.dataset.telemetry)}/telemetry?limit=200`))
    .reverse();
  const labels = rows.map((r) => clock(r.window_end_ms));
  const sum = (r, key) => r.models.reduce((a, m) => a + (m[key] || 0), 0);
  const weighted = (r, key) => {
    const n = sum(r, "inference_count");
    return n ? r.models.reduce((a, m) => a + m[key] * m.inference_count, 0) / n : null;
  };
  lineChart("chart-latency", labels, [
    { label: "p50", data: rows.map((r) => weighted(r, "latency_p50_ms")) },
    { label: "p95", data: rows.map((r) => weighted(r, "latency_p95_ms")) },
  ]);
  lineChart("chart-errors", labels, [{ label: "error rate", data: rows.map((r) => {
    const n = sum(r, "inference_count"); return n ? sum(r, "error_count") / n : 0; }) }],
  { scales: { y: { min: 0, suggestedMax: 0.05 } } });
  lineChart("chart-cpu", labels, [{ label: "CPU %", data: rows.map((r) => r.system.cpu_percent) }]);
  lineChart("chart-memory", labels, [{ label: "memory %", data: rows.map((r) => r.system.mem_percent) }]);
  const temperature = rows.map((r) => r.system.temperature_c ?? null);
  const note = document.getElementById("no-temperature");
  const some = temperature.some((t) => t !== null);
  if (note) note.hidden = some || rows.length === 0;
  document.getElementById("chart-temperature").hidden = !some;
  if (some) lineChart("chart-temperature", labels, [{ label: "°C", data: temperature }]);
  box.dataset.windows = String(rows.length);
}

function setupTelemetry() {
  const box = document.querySelector("[data-telemetry]");
  if (!box) return;
  const slot = box.querySelector("[data-error]");
  const draw = () => drawTelemetry(box).then(() => showError(slot, null), (err) => showError(slot, err));
  draw();
  every(CHART_POLL_MS, draw);
}

const FEATURE_LINES = 12;

async function drawDrift(box) {
  const m = encodeURIComponent(box.dataset.model), v = encodeURIComponent(box.dataset.version);
  const drift = await api("GET", `/v1/models/${m}/versions/${v}/drift`);
  const windows = drift.fleet;
  const labels = windows.map((w) => clock(w.window_end_ms));
  const thresholds = JSON.parse(box.dataset.thresholds || "[]").filter((t) => t.metric === "psi");
  const limits = thresholds.map((t) => ({
    label: `threshold ${t.policy}`, data: windows.map(() => t.threshold),
    borderDash: [6, 4], pointRadius: 0, borderColor: "#c0392b", backgroundColor: "#c0392b",
  }));
  lineChart("chart-drift", labels, [{
    label: "PSI (fleet)", data: windows.map((w) => w.psi), borderWidth: 2,
    borderColor: "#2457c5", backgroundColor: "#2457c5",
  }, ...limits]);
  // The features that drift most in the latest window, so a model with hundreds stays legible.
  const latest = windows.length ? windows[windows.length - 1].features : {};
  const features = Object.keys(latest).sort((a, b) => (latest[b].psi || 0) - (latest[a].psi || 0))
    .slice(0, FEATURE_LINES);
  lineChart("chart-drift-features", labels, [
    ...features.map((name) => ({
      label: name, data: windows.map((w) => (w.features[name] ? w.features[name].psi : null)),
    })),
    ...limits,
  ]);
  const shown = Object.keys(latest).length > FEATURE_LINES
    ? `; the ${FEATURE_LINES} features drifting most of ${Object.keys(latest).length}` : "";
  document.getElementById("drift-summary").textContent =
    `${windows.length} windows; baseline ${drift.baseline.source}, ${drift.baseline.samples} samples${shown}`;
  box.dataset.windows = String(windows.length);
}

function setupDrift() {
  const choice = document.getElementById("drift-choice");
  if (choice) choice.addEventListener("change", () => {
    const [model, version] = choice.value.split("|");
    window.location = `/ui/drift?model=${encodeURIComponent(model)}&version=${encodeURIComponent(version)}`;
  });
  const box = document.getElementById("drift");
  if (!box) return;
  const slot = box.querySelector("[data-error]");
  const draw = () => drawDrift(box).then(() => showError(slot, null), (err) => showError(slot, err));
  draw();
  every(CHART_POLL_MS, draw);
}

function setupLogout() {
  const button = document.getElementById("logout");
  if (!button) return;
  button.addEventListener("click", async () => {
    try { await api("POST", "/ui/logout"); } finally { window.location = "/ui/login"; }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  localTimes(document);
  setupLogout();
  setupNewRollout();
  setupRolloutActions();
  setupLive();
  setupTelemetry();
  setupDrift();
});
