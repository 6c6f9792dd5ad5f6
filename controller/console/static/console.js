// The console's behaviour: actions through the REST API (session cookie + CSRF header),
// live rollout progress by polling, and charts drawn by the vendored Chart.js.
"use strict";

const csrf = () => document.querySelector('meta[name="csrf-token"]').content;

async function api(method, path, body) {
  const headers = { "X-CSRF-Token": csrf() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (res.status === 401) { window.location = "/ui/login?next=" + encodeURIComponent(location.pathname); }
  const text = await res.text();
  const data = text ? JSON.parse(text) : null;
  if (!res.ok) {
    const detail = data && data.detail;
    throw new Error(`${res.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
  }
  return data;
}

function showError(scope, err) {
  const slot = scope.querySelector("[data-error]");
  if (slot) slot.textContent = err ? err.message : "";
}

function localTimes(root) {
  root.querySelectorAll("time[data-ts]").forEach((t) => {
    const ts = parseFloat(t.dataset.ts);
    if (ts) { t.title = t.textContent; t.textContent = new Date(ts * 1000).toLocaleString(); }
  });
}

function listOf(text) { return text.split(",").map((s) => s.trim()).filter(Boolean); }

function rolloutBody(form) {
  const f = new FormData(form);
  const soak = parseFloat(f.get("soak") || "0") || 0;
  const waves = listOf(f.get("waves") || "").map((w) =>
    w.endsWith("%") ? { percent: parseFloat(w), soak_s: soak } : { count: parseInt(w, 10), soak_s: soak });
  const devices = listOf(f.get("devices") || "");
  const tags = listOf(f.get("tags") || "");
  const body = {
    model: f.get("model"), version: (f.get("version") || "").trim(),
    target: { devices, tags, all: devices.length === 0 && tags.length === 0 },
    manual_approval: f.get("manual_approval") === "on",
  };
  if (waves.length) body.waves = waves;
  return body;
}

function setupNewRollout() {
  const form = document.getElementById("new-rollout");
  if (!form) return;
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    showError(form, null);
    const body = rolloutBody(form);
    const where = body.target.all ? "every device" : [...body.target.devices, ...body.target.tags].join(", ");
    if (!confirm(`Roll ${body.model} ${body.version} out to ${where}?`)) return;
    try {
      const created = await api("POST", "/v1/rollouts", body);
      window.location = `/ui/rollouts/${created.id}`;
    } catch (err) { showError(form, err); }
  });
}

function setupRolloutActions() {
  const box = document.getElementById("rollout-actions");
  if (!box) return;
  box.querySelectorAll("button[data-command]").forEach((button) => {
    button.addEventListener("click", async () => {
      const command = button.dataset.command;
      showError(box, null);
      if (!confirm(`${button.textContent.trim()} rollout ${box.dataset.rollout}?`)) return;
      try {
        await api("POST", `/v1/rollouts/${box.dataset.rollout}/${command}`, { reason: "from the console" });
        await refreshLive();
      } catch (err) { showError(box, err); }
    });
  });
}

async function refreshLive() {
  const live = document.getElementById("rollout-live");
  if (!live) return;
  const res = await fetch(live.dataset.live, { credentials: "same-origin" });
  if (res.redirected || res.status === 401) { window.location = "/ui/login"; return; }
  if (res.ok) { live.innerHTML = await res.text(); localTimes(live); }
}

function setupLive() {
  const live = document.getElementById("rollout-live");
  if (!live) return;
  // Poll while the page is open: a rollout resumed or rolled back moves again.
  setInterval(() => { refreshLive().catch(() => {}); }, 1500);
}

function lineChart(id, labels, datasets, extra) {
  const canvas = document.getElementById(id);
  if (!canvas || !window.Chart) return null;
  return new window.Chart(canvas, {
    type: "line",
    data: { labels, datasets },
    options: Object.assign({
      animation: false, responsive: true, maintainAspectRatio: false, spanGaps: true,
      elements: { point: { radius: 2 } }, plugins: { legend: { display: datasets.length > 1 } },
    }, extra || {}),
  });
}

const clock = (ms) => new Date(ms).toLocaleTimeString();

async function setupTelemetry() {
  const box = document.querySelector("[data-telemetry]");
  if (!box) return;
  const rows = (await api("GET", `/v1/devices/${box.dataset.telemetry}/telemetry?limit=200`)).reverse();
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
    const n = sum(r, "inference_count"); return n ? sum(r, "error_count") / n : 0; }) }]);
  lineChart("chart-cpu", labels, [{ label: "CPU %", data: rows.map((r) => r.system.cpu_percent) }]);
  lineChart("chart-memory", labels, [{ label: "memory %", data: rows.map((r) => r.system.mem_percent) }]);
  lineChart("chart-temperature", labels, [{ label: "°C", data: rows.map((r) => r.system.temperature_c ?? null) }]);
}

async function setupDrift() {
  const choice = document.getElementById("drift-choice");
  if (choice) choice.addEventListener("change", () => {
    const [model, version] = choice.value.split("|");
    window.location = `/ui/drift?model=${encodeURIComponent(model)}&version=${encodeURIComponent(version)}`;
  });
  const box = document.getElementById("drift");
  if (!box) return;
  try {
    const m = encodeURIComponent(box.dataset.model), v = encodeURIComponent(box.dataset.version);
    const drift = await api("GET", `/v1/models/${m}/versions/${v}/drift`);
    const windows = drift.fleet;
    const labels = windows.map((w) => clock(w.window_end_ms));
    const thresholds = JSON.parse(box.dataset.thresholds || "[]").filter((t) => t.metric === "psi");
    const sets = [{ label: "PSI (fleet)", data: windows.map((w) => w.psi), borderWidth: 2 }];
    thresholds.forEach((t) => sets.push({
      label: `threshold ${t.policy}`, data: windows.map(() => t.threshold),
      borderDash: [6, 4], pointRadius: 0, borderColor: "#c0392b",
    }));
    lineChart("chart-drift", labels, sets);
    const features = windows.length ? Object.keys(windows[windows.length - 1].features) : [];
    lineChart("chart-drift-features", labels, features.slice(0, 12).map((name) => ({
      label: name, data: windows.map((w) => (w.features[name] ? w.features[name].psi : null)),
    })));
    document.getElementById("drift-summary").textContent =
      `${windows.length} windows; baseline ${drift.baseline.source}, ${drift.baseline.samples} samples`;
    box.dataset.windows = String(windows.length);
  } catch (err) { showError(box, err); }
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
  setupTelemetry().catch(() => {});
  setupDrift();
});
