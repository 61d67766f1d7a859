// dynamo-local status page: components, live charts, GPU map, prefill queue, recent scale
// events. Live through the server's Server-Sent Events stream (read with fetch so that a
// bearer token can be sent); a slow poll backs it up. Everything is built with DOM calls and
// textContent: nothing from the server is ever parsed as HTML. The charts are plotly.js
// (served by this server); plotly reads a few tags (<b>, <br>) in the strings it is given,
// so every string from the server goes through plain() first and shows as written.
"use strict";

const SHOWN_KINDS = new Set(["scale", "restart", "crashloop", "decision", "exit"]);
const MAX_EVENTS = 50;
const QUEUE_POLL_MS = 2000;
const QUEUE_POINTS = 300; // ten minutes at one point every two seconds
const BACKSTOP_MS = 5000;
const TIMELINE_POLL_MS = 1000;
const PALETTE = ["#3e8ed0", "#2fbf71", "#e0a526", "#e5484d", "#a371f7", "#39c5cf", "#f778ba",
  "#8a96a3"];
const PHASE_FILL = ["rgba(62,142,208,0.13)", "rgba(224,165,38,0.13)", "rgba(47,191,113,0.13)"];
const RETRY_MS = 2000;

const state = {
  token: null,
  lastSeq: 0,
  events: [],
  queue: [], // [time ms, pending or null]
  refreshTimer: null,
  streamAbort: null,
  // The connector's live timeline (GET /v1/timeline): samples after `seq` are fetched.
  timeline: {
    seq: 0, capacity: 900, samples: [], components: [], frontends: [], experiment: null,
    polling: false,
  },
};

// ------------------------------------------------------------------ helpers

function $(id) {
  return document.getElementById(id);
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, String(value));
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function readToken() {
  const match = /(?:^#|&)token=([^&]+)/.exec(window.location.hash);
  if (match) {
    sessionStorage.setItem("dynamo-local-token", decodeURIComponent(match[1]));
    history.replaceState(null, "", window.location.pathname + window.location.search);
  }
  state.token = sessionStorage.getItem("dynamo-local-token");
}

function headers(extra) {
  const out = Object.assign({ Accept: "application/json" }, extra || {});
  if (state.token) out.Authorization = "Bearer " + state.token;
  return out;
}

class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || "HTTP " + status);
    this.status = status;
    this.code = error.code;
  }
}

async function api(path) {
  const response = await fetch(path, { headers: headers(), cache: "no-store" });
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (response.status === 401) askForToken();
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

function askForToken() {
  $("token-form").hidden = false;
}

// --------------------------------------------------------------- components

function renderComponents(data) {
  $("namespace").textContent = data.namespace;
  const body = document.querySelector("#components tbody");
  const rows = data.components.map((c) => {
    const r = c.replicas;
    const share = r.desired > 0 ? Math.min(100, (100 * r.ready) / r.desired) : 0;
    const role = c.sub_component_type ? c.role + " (" + c.sub_component_type + ")" : c.role;
    const badge = el(
      "span",
      { class: "badge status-" + c.status + (c.scale_in_flight ? " inflight" : "") },
      c.status,
    );
    const bar = el("span", { class: "bar" }, el("span", { style: "" }));
    bar.firstChild.style.width = share + "%";
    return el(
      "tr",
      {
        "data-component": c.name,
        "data-status": c.status,
        "data-ready": r.ready,
        "data-desired": r.desired,
      },
      el("td", {}, c.name),
      el("td", {}, role),
      el("td", {}, badge),
      el("td", { class: "replicas" }, r.ready + " / " + r.desired, bar),
      el("td", {}, r.running),
      el("td", {}, c.restarts),
      el("td", { class: "muted" }, c.reason || ""),
    );
  });
  body.replaceChildren(...rows);
}

// --------------------------------------------------------------- live charts

// Plotly interprets a few HTML-like tags and entities in text; escaped, they show as is.
function plain(text) {
  return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

function at(seconds) {
  return new Date(seconds * 1000);
}

function column(samples, key) {
  return samples.map((s) => (s[key] === null || s[key] === undefined ? null : s[key]));
}

function replicaTraces(samples, components) {
  const x = samples.map((s) => at(s.time));
  const traces = [];
  components.forEach((c, i) => {
    const colour = PALETTE[i % PALETTE.length];
    const counts = (field) =>
      samples.map((s) => (s.components[c.name] ? s.components[c.name][field] : null));
    traces.push({
      x, y: counts("desired"), name: plain(c.name + " desired"), legendgroup: plain(c.name),
      mode: "lines", line: { shape: "hv", dash: "dash", width: 1, color: colour }, yaxis: "y",
    });
    traces.push({
      x, y: counts("ready"), name: plain(c.name + " ready"), legendgroup: plain(c.name),
      mode: "lines", line: { shape: "hv", width: 2, color: colour }, yaxis: "y",
    });
  });
  const scales = samples.flatMap((s) => s.marks.filter((m) => m.kind === "scale"));
  if (scales.length) {
    traces.push({
      x: scales.map((m) => at(m.time)),
      y: scales.map((m) => (m.to_replicas === undefined ? null : m.to_replicas)),
      name: "scale events",
      mode: "markers",
      marker: {
        size: 11,
        color: "#e5484d",
        symbol: scales.map((m) => ((m.to_replicas || 0) >= (m.from_replicas || 0) ? "triangle-up" : "triangle-down")),
      },
      hovertext: scales.map((m) => plain(m.text)),
      hoverinfo: "text+x",
      yaxis: "y",
    });
  }
  return traces;
}

function frontendTraces(samples) {
  const x = samples.map((s) => at(s.time));
  const line = (key, name, colour, axis, dash) => ({
    x, y: column(samples, key), name, mode: "lines", yaxis: axis,
    line: { color: colour, width: 2, dash: dash || "solid" }, connectgaps: false,
  });
  const traces = [
    line("request_rate", "req/s", "#e5484d", "y2"),
    line("inflight", "in flight", "#2fbf71", "y2"),
  ];
  if (samples.some((s) => s.target_concurrency !== null)) {
    traces.push(line("target_concurrency", "target concurrency", "#a371f7", "y2", "dot"));
  }
  if (samples.some((s) => s.target_request_rate !== null)) {
    traces.push(line("target_request_rate", "target req/s", "#f778ba", "y2", "dot"));
  }
  traces.push(line("ttft_p99_s", "TTFT p99 (s)", "#3e8ed0", "y3"));
  traces.push(line("itl_p99_s", "ITL p99 (s)", "#e0a526", "y3"));
  return traces;
}

// A running (or just finished) experiment's phases, shaded across every chart.
function phaseShapes(experiment, end) {
  const shapes = [];
  const notes = [];
  if (!experiment) return { shapes, notes };
  experiment.phases.forEach((p, i) => {
    if (p.start === null) return;
    const x0 = at(p.start);
    const x1 = at(p.end === null ? end : p.end);
    shapes.push({
      type: "rect", xref: "x", yref: "paper", x0, x1, y0: 0, y1: 1, line: { width: 0 },
      fillcolor: PHASE_FILL[i % PHASE_FILL.length], layer: "below",
    });
    notes.push({
      x: x0, y: 1, xref: "x", yref: "paper", text: plain(p.name), showarrow: false,
      xanchor: "left", yanchor: "bottom", font: { color: "#e4e8ec", size: 11 },
    });
  });
  return { shapes, notes };
}

function renderExperiment(experiment) {
  const box = $("experiment-now");
  if (!experiment) {
    box.replaceChildren();
    box.removeAttribute("data-state");
    return;
  }
  box.dataset.state = experiment.state;
  box.dataset.id = experiment.id;
  const parts = ["experiment " + experiment.name + ": " + experiment.state];
  if (experiment.phase) parts.push(experiment.phase);
  if (experiment.state === "running") {
    parts.push(Math.round(100 * experiment.progress.fraction) + "%");
  }
  const children = [parts.join(" \u00b7 ")];
  if (experiment.report) {
    children.push(" ");
    children.push(el("a", { href: "/v1/experiments/" + encodeURIComponent(experiment.id) + "/report", target: "_blank", rel: "noopener" }, "report"));
  }
  if (experiment.error) children.push(" \u2014 " + experiment.error);
  box.replaceChildren(...children.map((c) => (c instanceof Node ? c : document.createTextNode(c))));
}

function renderTimeline() {
  const t = state.timeline;
  const chart = $("live-chart");
  renderExperiment(t.experiment);
  if (typeof window.Plotly === "undefined") {
    $("live-status").textContent = "charts unavailable: plotly.js did not load (the server needs the plotly package)";
    return;
  }
  const samples = t.samples;
  const withFrontend = t.frontends.length > 0;
  const traces = replicaTraces(samples, t.components);
  if (withFrontend) traces.push(...frontendTraces(samples));
  const end = samples.length ? samples[samples.length - 1].time : Date.now() / 1000;
  const { shapes, notes } = phaseShapes(t.experiment, end);
  const axis = { gridcolor: "#26303a", zerolinecolor: "#26303a", color: "#8a96a3" };
  const layout = {
    height: withFrontend ? 560 : 260,
    margin: { l: 55, r: 20, t: 24, b: 36 },
    paper_bgcolor: "#171d23",
    plot_bgcolor: "#101418",
    font: { color: "#e4e8ec", size: 12 },
    hovermode: "x unified",
    showlegend: true,
    legend: { orientation: "h", y: -0.12 },
    uirevision: "live", // zoom and hidden traces survive the updates
    xaxis: Object.assign({ type: "date" }, axis, withFrontend ? { anchor: "y3" } : {}),
    yaxis: Object.assign({ title: { text: "replicas" }, rangemode: "tozero", dtick: 1 }, axis, withFrontend ? { domain: [0.7, 1] } : {}),
    shapes,
    annotations: notes,
  };
  if (withFrontend) {
    layout.yaxis2 = Object.assign({ title: { text: "load" }, rangemode: "tozero", domain: [0.37, 0.63], anchor: "x" }, axis);
    layout.yaxis3 = Object.assign({ title: { text: "latency (s)" }, type: "log", domain: [0, 0.3], anchor: "x" }, axis);
  }
  window.Plotly.react(chart, traces, layout, { displaylogo: false, responsive: true });
  chart.dataset.samples = String(samples.length);
  chart.dataset.traces = String(traces.length);
  $("live-status").textContent = samples.length
    ? (withFrontend ? "" : "no frontend in this graph: replicas only")
    : "sampling started; the first points come within a second or two";
}

async function pollTimeline() {
  const t = state.timeline;
  if (t.polling) return; // a slow answer: the next tick asks again, never twice at once
  t.polling = true;
  try {
    const data = await api("/v1/timeline?since=" + t.seq);
    // A ring that started again (the connector restarted) begins below our cursor.
    if (data.samples.length && data.samples[0].seq <= t.seq) t.samples = [];
    t.samples.push(...data.samples);
    t.capacity = data.capacity;
    if (t.samples.length > t.capacity) t.samples.splice(0, t.samples.length - t.capacity);
    t.seq = data.last_seq;
    t.components = data.components;
    t.frontends = data.frontends;
    t.experiment = data.experiment;
    renderTimeline();
  } catch (err) {
    $("live-status").textContent = "timeline: " + err.message;
  } finally {
    t.polling = false;
  }
}

// ---------------------------------------------------------------------- GPUs

function gpuOwners(gpu) {
  if (Array.isArray(gpu.owners)) return gpu.owners;
  if (gpu.owner) return [gpu.owner];
  return [];
}

function formatBytes(bytes) {
  if (typeof bytes !== "number") return "";
  const gib = bytes / 1024 ** 3;
  return gib >= 1 ? gib.toFixed(1) + " GiB" : (bytes / 1024 ** 2).toFixed(0) + " MiB";
}

function renderResources(data) {
  const gpus = Array.isArray(data.gpus) ? data.gpus : [];
  const cards = gpus.map((gpu, index) => {
    const owners = gpuOwners(gpu);
    const stateName = gpu.state || (owners.length ? "allocated" : "free");
    const label = gpu.index !== undefined ? "GPU " + gpu.index : "GPU " + index;
    const memory =
      gpu.memory_total_bytes !== undefined
        ? formatBytes(gpu.memory_used_bytes) + " / " + formatBytes(gpu.memory_total_bytes)
        : "";
    return el(
      "div",
      { class: "gpu", "data-state": stateName, "data-uuid": gpu.uuid },
      el("strong", {}, label + (gpu.name ? " · " + gpu.name : "")),
      el("div", { class: "uuid", title: gpu.uuid || "" }, gpu.uuid || ""),
      el("div", {}, stateName + (owners.length ? ": " + owners.join(", ") : "")),
      memory ? el("div", { class: "muted" }, memory) : null,
    );
  });
  if (!cards.length) cards.push(el("p", { class: "muted" }, "no GPUs on this machine"));
  $("gpus").replaceChildren(...cards);
  const parts = [];
  if (data.cpu && typeof data.cpu.allocatable_cores === "number") {
    parts.push(
      "CPU " + (data.cpu.reserved_cores || 0) + " / " + data.cpu.allocatable_cores + " cores",
    );
  }
  if (data.memory && typeof data.memory.allocatable_bytes === "number") {
    parts.push(
      "memory " +
        formatBytes(data.memory.reserved_bytes || 0) +
        " / " +
        formatBytes(data.memory.allocatable_bytes),
    );
  }
  const lingering = Array.isArray(data.lingering) ? data.lingering : [];
  if (lingering.length) {
    // Stopped replicas whose processes outlived the release still hold their resources.
    parts.push(
      "held by stopped replicas still running: " +
        lingering.map((l) => l.replica + " (PIDs " + (l.pids || []).join(", ") + ")").join(", "),
    );
  }
  $("budgets").textContent = parts.length ? "reserved: " + parts.join(", ") : "";
}

// ------------------------------------------------------------- prefill queue

function queueDepth(data) {
  if (!data || (data.status && data.status !== "ok")) return null;
  return typeof data.pending === "number" ? data.pending : null;
}

function renderQueue() {
  const svg = $("queue-chart");
  const ns = "http://www.w3.org/2000/svg";
  const points = state.queue;
  const values = points.map((p) => p[1]).filter((v) => v !== null);
  const top = Math.max(5, ...values);
  const now = Date.now();
  const span = QUEUE_POINTS * QUEUE_POLL_MS;
  const coords = points
    .filter((p) => p[1] !== null)
    .map((p) => {
      const x = 600 - ((now - p[0]) / span) * 600;
      const y = 115 - (p[1] / top) * 105;
      return x.toFixed(1) + "," + y.toFixed(1);
    });
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", coords.join(" "));
  const grid = document.createElementNS(ns, "line");
  for (const [k, v] of Object.entries({ x1: 0, x2: 600, y1: 10, y2: 10 })) grid.setAttribute(k, v);
  const label = document.createElementNS(ns, "text");
  label.setAttribute("x", 4);
  label.setAttribute("y", 20);
  label.textContent = String(top);
  svg.replaceChildren(grid, label, line);
}

async function pollQueue() {
  let depth = null;
  try {
    const data = await api("/v1/prefill-queue");
    depth = queueDepth(data);
    $("queue-status").textContent =
      depth === null ? data.reason || "queue " + (data.status || "unavailable") : "";
  } catch (err) {
    $("queue-status").textContent = err.message;
  }
  state.queue.push([Date.now(), depth]);
  if (state.queue.length > QUEUE_POINTS) state.queue.splice(0, state.queue.length - QUEUE_POINTS);
  $("queue-now").textContent = depth === null ? "" : depth + " pending";
  $("queue-chart").setAttribute("data-points", String(state.queue.length));
  renderQueue();
}

// ------------------------------------------------------------------- events

function describeEvent(e) {
  const parts = [e.kind];
  if (e.component) parts.push(e.component);
  if (e.replica) parts.push("#" + e.replica);
  if (e.from_replicas !== undefined && e.to_replicas !== undefined) {
    parts.push(e.from_replicas + " \u2192 " + e.to_replicas);
  }
  if (e.source) parts.push("(" + e.source + ")");
  return parts.join(" ");
}

function renderEvents() {
  const items = state.events
    .slice()
    .reverse()
    .map((e) =>
      el(
        "li",
        { "data-seq": e.seq, "data-kind": e.kind, "data-component": e.component },
        el("time", {}, new Date(e.time * 1000).toLocaleTimeString()),
        describeEvent(e),
        e.outcome ? el("span", { class: "outcome-" + e.outcome }, " " + e.outcome) : null,
        e.duration_s !== undefined ? el("span", { class: "muted" }, " " + e.duration_s.toFixed(2) + " s") : null,
        e.reason ? el("span", { class: "muted" }, " \u2014 " + e.reason) : null,
      ),
    );
  $("events").replaceChildren(...items);
}

function addEvent(e) {
  if (e.seq <= state.lastSeq) return;
  state.lastSeq = e.seq;
  if (!SHOWN_KINDS.has(e.kind)) return;
  state.events.push(e);
  if (state.events.length > MAX_EVENTS) state.events.shift();
}

// ---------------------------------------------------------------- refreshing

async function refresh() {
  try {
    renderComponents(await api("/v1/components"));
    showError("");
  } catch (err) {
    showError("components: " + err.message);
  }
  try {
    renderResources(await api("/v1/resources"));
  } catch (err) {
    $("gpus").replaceChildren(el("p", { class: "muted" }, "resources: " + err.message));
  }
}

function scheduleRefresh() {
  if (state.refreshTimer !== null) return;
  state.refreshTimer = setTimeout(() => {
    state.refreshTimer = null;
    refresh();
  }, 150);
}

function setLive(name) {
  const badge = $("live");
  badge.dataset.state = name;
  badge.textContent = name;
}

// One SSE message: "id:", "event:" and "data:" lines.
function handleMessage(lines) {
  let kind = "message";
  const data = [];
  for (const line of lines) {
    if (line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") kind = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return;
  if (kind === "shutdown") {
    setLive("server stopped");
    return;
  }
  if (kind !== "message") return;
  addEvent(JSON.parse(data.join("\n")));
  renderEvents();
  scheduleRefresh();
}

async function stream() {
  for (;;) {
    const abort = new AbortController();
    state.streamAbort = abort;
    try {
      const response = await fetch("/v1/events?since=" + state.lastSeq, {
        headers: headers({ Accept: "text/event-stream" }),
        signal: abort.signal,
        cache: "no-store",
      });
      if (response.status === 401) askForToken();
      if (!response.ok || !response.body) throw new Error("HTTP " + response.status);
      setLive("live");
      scheduleRefresh();
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          handleMessage(buffer.slice(0, cut).split("\n"));
          buffer = buffer.slice(cut + 2);
        }
      }
    } catch (_) {
      // fall through to the retry below
    }
    if ($("live").dataset.state !== "server stopped") setLive("reconnecting");
    await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
  }
}

async function loadEvents() {
  try {
    const data = await api("/v1/events?limit=" + MAX_EVENTS * 4);
    for (const e of data.events) addEvent(e);
    state.lastSeq = Math.max(state.lastSeq, data.last_seq);
    renderEvents();
  } catch (err) {
    showError("events: " + err.message);
  }
}

function start() {
  readToken();
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = $("token-input").value.trim();
    sessionStorage.setItem("dynamo-local-token", state.token);
    $("token-form").hidden = true;
    if (state.streamAbort) state.streamAbort.abort();
    refresh();
  });
  refresh();
  loadEvents().then(stream);
  pollQueue();
  setInterval(pollQueue, QUEUE_POLL_MS);
  pollTimeline();
  setInterval(pollTimeline, TIMELINE_POLL_MS);
  setInterval(refresh, BACKSTOP_MS);
}

document.addEventListener("DOMContentLoaded", start);
