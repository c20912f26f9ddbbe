// qforge dashboard: plain JS over the OpenAI-compatible API of the same server. It polls; it
// never builds HTML from data (textContent only), so job names and messages cannot inject markup.
"use strict";

const POLL_MS = 1500;
const state = { key: localStorage.getItem("qforge.apiKey") || "", selected: null, jobs: [], models: [],
                chat: [], busy: false };
const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v; else if (k === "dataset") Object.assign(node.dataset, v); else node[k] = v;
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.key) headers["Authorization"] = "Bearer " + state.key;
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(options.json);
  }
  const response = await fetch("/v1" + path, { method: options.method || "GET", headers, body: options.body });
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = text; }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : (response.status + " " + response.statusText);
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return body;
}

function when(ts) { return ts ? new Date(ts * 1000).toLocaleTimeString() : ""; }
function shortId(id) { return id.length > 18 ? id.slice(0, 12) + "…" + id.slice(-4) : id; }
function setStatus(id, text, isError) {
  const node = $(id);
  node.textContent = text;
  node.className = "status-line" + (isError ? " error" : "");
}

// ---- jobs list ------------------------------------------------------------------------------
async function refreshJobs() {
  const page = await api("/fine_tuning/jobs?limit=100");
  state.jobs = page.data;
  const body = $("jobs").querySelector("tbody");
  body.replaceChildren(...state.jobs.map((job) => {
    const row = el("tr", { dataset: { jobId: job.id }, class: job.id === state.selected ? "selected" : "" },
      el("td", { class: "mono", title: job.id }, shortId(job.id)),
      el("td", {}, el("span", { class: "badge status " + job.status }, job.status)),
      el("td", { class: "mono" }, job.fine_tuned_model || job.model),
      el("td", {}, when(job.created_at)));
    row.addEventListener("click", () => { state.selected = job.id; refreshJobs(); refreshDetail(); });
    return row;
  }));
  $("jobs-empty").hidden = state.jobs.length > 0;
  $("server-status").textContent = "connected";
}

// ---- one job --------------------------------------------------------------------------------
async function allEvents(jobId) {
  const events = [];
  let after = "";
  for (let i = 0; i < 20; i++) {  // pages of 1000, newest first
    const page = await api(`/fine_tuning/jobs/${jobId}/events?limit=1000` + (after ? `&after=${after}` : ""));
    events.push(...page.data);
    if (!page.has_more || !page.data.length) break;
    after = page.data[page.data.length - 1].id;
  }
  return events.reverse();  // oldest first
}

async function refreshDetail() {
  const jobId = state.selected;
  $("detail-none").hidden = !!jobId;
  $("detail-body").hidden = !jobId;
  $("detail-id").textContent = jobId || "";
  if (!jobId) return;
  const [job, events, checkpoints] = await Promise.all([
    api(`/fine_tuning/jobs/${jobId}`), allEvents(jobId), api(`/fine_tuning/jobs/${jobId}/checkpoints?limit=100`)]);
  if (state.selected !== jobId) return;
  $("detail-status").textContent = job.status;
  $("detail-status").className = "status " + job.status;
  const active = ["validating_files", "queued", "running"].includes(job.status);
  $("detail-model").textContent = job.fine_tuned_model || (active ? "(when it succeeds)" : "none");
  const type = (job.method && job.method.type) || "supervised";
  const hp = (job.method && job.method[type] && job.method[type].hyperparameters) || {};
  const batch = hp.batch_size ?? job.hyperparameters.batch_size;
  const objective = type === "supervised" ? "" : `${type}${hp.beta != null ? " (beta " + hp.beta + ")" : ""}, `;
  $("detail-method").textContent = `${objective}${hp.method || "?"}, rank ${hp.rank ?? "?"}, batch ${batch}`;
  $("detail-tokens").textContent = job.trained_tokens ?? "";
  $("detail-error").hidden = !job.error;
  $("detail-error").textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
  $("cancel-job").disabled = !active;
  $("events").replaceChildren(...events.slice(-200).reverse().map((e) =>
    el("li", { class: e.level }, el("span", { class: "when" }, when(e.created_at)), e.message)));
  $("checkpoints").querySelector("tbody").replaceChildren(...checkpoints.data.map((c) =>
    el("tr", {}, el("td", {}, c.step_number),
       el("td", {}, c.metrics.train_loss != null ? c.metrics.train_loss.toFixed(4) : ""),
       el("td", { class: "mono" }, c.fine_tuned_model_checkpoint))));
  const metrics = events.filter((e) => e.type === "metrics" && e.data);
  drawLoss(metrics);
  drawRewards(metrics);
}

// ---- charts (SVG in viewBox units; scales from the data) ----------------------------------------
const SVG_NS = "http://www.w3.org/2000/svg";

function svgNode(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  Object.entries(attrs).forEach(([k, v]) => node.setAttribute(k, v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// box: {W, H, pad}; steps [x0, x1]; values [y0, y1] (widened when flat): {x(step), y(value), y0, y1}
function scales(box, x0, x1, y0, y1) {
  if (y1 - y0 < 1e-6) { y0 -= 0.5; y1 += 0.5; }
  const { W, H, pad } = box;
  return { y0, y1, x: (s) => pad.l + (s - x0) / (x1 - x0) * (W - pad.l - pad.r),
           y: (v) => pad.t + (1 - (v - y0) / (y1 - y0)) * (H - pad.t - pad.b) };
}

function pointsOf(series, sc) { return series.map(([s, v]) => `${sc.x(s).toFixed(1)},${sc.y(v).toFixed(1)}`).join(" "); }

// grid lines with the left scale's labels (and the right scale's, when given), and the step range
function drawAxes(axes, box, x0, x1, left, right) {
  axes.replaceChildren();
  for (const f of [1, 0.5, 0]) {
    const y = left.y(left.y0 + f * (left.y1 - left.y0));
    axes.append(svgNode("line", { x1: box.pad.l, x2: box.W - box.pad.r, y1: y, y2: y }),
                svgNode("text", { x: 2, y: y + 4 }, (left.y0 + f * (left.y1 - left.y0)).toFixed(3)));
    if (right) axes.append(svgNode("text", { x: box.W - 2, y: y + 4, "text-anchor": "end" },
                                   (right.y0 + f * (right.y1 - right.y0)).toFixed(3)));
  }
  for (const [s, anchor] of [[x0, "start"], [x1, "end"]]) {
    axes.append(svgNode("text", { x: left.x(s), y: box.H - 6, "text-anchor": anchor }, "step " + s));
  }
}

function seriesOf(metrics, key) {
  return metrics.filter((m) => m.data[key] != null).map((m) => [m.data.step, m.data[key]]);
}

function drawLoss(metrics) {
  const box = { W: 600, H: 220, pad: { l: 44, r: 10, t: 10, b: 22 } };
  const train = seriesOf(metrics, "train_loss"), valid = seriesOf(metrics, "valid_loss");
  const all = train.concat(valid);
  if (!all.length) {
    $("loss-axes").replaceChildren();
    $("loss-line").setAttribute("points", "");
    $("valid-line").setAttribute("points", "");
    return;
  }
  const steps = all.map((p) => p[0]), losses = all.map((p) => p[1]);
  const x0 = Math.min(...steps), x1 = Math.max(x0 + 1, ...steps);
  const sc = scales(box, x0, x1, Math.min(...losses), Math.max(...losses));
  $("loss-line").setAttribute("points", pointsOf(train, sc));
  $("valid-line").setAttribute("points", pointsOf(valid, sc));
  drawAxes($("loss-axes"), box, x0, x1, sc);
}

// A DPO/ORPO job's steps: reward accuracy (left axis, 0..1) and margin (right axis) curves, and a
// table of the last steps' rewards. Hidden for a job whose events carry none.
function drawRewards(metrics) {
  const rows = metrics.filter((m) => m.data["rewards/accuracies"] != null);
  $("rewards").hidden = !rows.length;
  if (!rows.length) return;
  const box = { W: 600, H: 180, pad: { l: 44, r: 52, t: 10, b: 22 } };
  const accuracy = seriesOf(rows, "rewards/accuracies"), margin = seriesOf(rows, "rewards/margins");
  const steps = rows.map((m) => m.data.step), x0 = Math.min(...steps), x1 = Math.max(x0 + 1, ...steps);
  const left = scales(box, x0, x1, 0, 1);
  const margins = margin.map((p) => p[1]);
  const right = scales(box, x0, x1, Math.min(0, ...margins), Math.max(0, ...margins));
  $("accuracy-line").setAttribute("points", pointsOf(accuracy, left));
  $("margin-line").setAttribute("points", pointsOf(margin, right));
  drawAxes($("reward-axes"), box, x0, x1, left, right);
  const fixed = (v) => (v != null ? v.toFixed(4) : "");
  $("reward-table").querySelector("tbody").replaceChildren(...rows.slice(-10).reverse().map((m) =>
    el("tr", {}, el("td", {}, m.data.step), el("td", {}, fixed(m.data.train_loss)),
       el("td", {}, fixed(m.data["rewards/accuracies"])), el("td", {}, fixed(m.data["rewards/margins"])),
       el("td", {}, fixed(m.data["rewards/chosen"])), el("td", {}, fixed(m.data["rewards/rejected"])))));
}

async function cancelJob() {
  if (!state.selected) return;
  try { await api(`/fine_tuning/jobs/${state.selected}/cancel`, { method: "POST" }); }
  catch (e) { alert(e.message); }
  refreshDetail();
}

// ---- files and new jobs ---------------------------------------------------------------------
async function refreshFiles(selectId) {
  const page = await api("/files?purpose=fine-tune&limit=100");
  const select = $("files-select");
  const current = selectId || select.value;
  select.replaceChildren(...page.data.map((f) =>
    el("option", { value: f.id, selected: f.id === current }, `${f.filename} (${f.id}, ${f.bytes} B)`)));
}

async function upload() {
  const input = $("upload-file");
  if (!input.files.length) { setStatus("upload-status", "Choose a .jsonl file first.", true); return; }
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", input.files[0]);
  setStatus("upload-status", "Uploading…");
  try {
    const file = await api("/files", { method: "POST", body: form });
    setStatus("upload-status", `Uploaded ${file.filename} as ${file.id}`);
    $("upload-status").dataset.fileId = file.id;
    await refreshFiles(file.id);
  } catch (e) {
    setStatus("upload-status", e.message, true);
  }
}

function numberField(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

async function createJob(event) {
  event.preventDefault();
  const hp = {};
  const fields = { n_epochs: "job-epochs", batch_size: "job-batch", learning_rate_multiplier: "job-lr",
                   rank: "job-rank", max_steps: "job-max-steps", max_seq_len: "job-max-seq-len",
                   save_every: "job-save-every" };
  for (const [key, id] of Object.entries(fields)) {
    const value = numberField(id);
    if (value !== undefined) hp[key] = value;
  }
  if ($("job-method").value !== "auto") hp.method = $("job-method").value;
  const type = $("job-type").value;
  const beta = numberField("job-beta");
  if (beta !== undefined && type !== "supervised") hp.beta = beta;
  const body = { model: state.models[0] || "", training_file: $("files-select").value,
                 method: { type, [type]: { hyperparameters: hp } } };
  const suffix = $("job-suffix").value.trim();
  if (suffix) body.suffix = suffix;
  try {
    const job = await api("/fine_tuning/jobs", { method: "POST", json: body });
    setStatus("create-status", `Created ${job.id}`);
    state.selected = job.id;
    await refreshJobs();
    await refreshDetail();
  } catch (e) {
    setStatus("create-status", e.message, true);
  }
}

// ---- models, adapters, chat -----------------------------------------------------------------
async function refreshModels() {
  const [models, adapters] = await Promise.all([api("/models"), api("/adapters")]);
  state.models = models.data.map((m) => m.id);
  $("models").replaceChildren(...state.models.map((id) => el("li", { class: "mono" }, id)));
  $("adapters").replaceChildren(...adapters.data.filter((a) => a.loaded).map((a) =>
    el("li", { class: "mono" }, a.id + (a.in_use ? ` (in use: ${a.in_use})` : ""))));
  const select = $("chat-model");
  const current = select.value;
  const wanted = state.models.includes(current) ? current : state.models[state.models.length - 1];
  select.replaceChildren(...state.models.map((id) => el("option", { value: id, selected: id === wanted }, id)));
}

function renderChat() {
  $("chat-log").replaceChildren(...state.chat.map((m) =>
    el("p", { class: "msg " + m.role }, el("b", {}, m.role === "user" ? "you: " : (m.model || "assistant") + ": "),
       m.content)));
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
}

async function sendChat() {
  const text = $("chat-input").value.trim();
  if (!text || state.busy) return;
  const model = $("chat-model").value;
  state.chat.push({ role: "user", content: text });
  $("chat-input").value = "";
  renderChat();
  state.busy = true;
  $("chat-send").disabled = true;
  try {
    const messages = state.chat.filter((m) => !m.error).map((m) => ({ role: m.role, content: m.content }));
    const reply = await api("/chat/completions", { method: "POST", json: {
      model, messages, max_tokens: numberField("chat-max-tokens") || 64, temperature: 0 } });
    state.chat.push({ role: "assistant", model, content: reply.choices[0].message.content });
  } catch (e) {
    state.chat.push({ role: "assistant", model: "error", content: e.message, error: true });
  } finally {
    state.busy = false;
    $("chat-send").disabled = false;
    renderChat();
  }
}

// ---- wiring ---------------------------------------------------------------------------------
let ticking = false;
async function tick() {
  if (ticking) return;  // a slow server: never stack polls
  ticking = true;
  try {
    await refreshJobs();
    await refreshDetail();
  } catch (e) {
    $("server-status").textContent = e.status === 401 ? "enter the API key" : "error: " + e.message;
  } finally {
    ticking = false;
  }
}

async function slowTick() {
  try { await Promise.all([refreshModels(), refreshFiles()]); } catch (e) { /* shown by tick */ }
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = state.key;
  $("save-key").addEventListener("click", () => {
    state.key = $("api-key").value.trim();
    localStorage.setItem("qforge.apiKey", state.key);
    tick(); slowTick();
  });
  $("upload-button").addEventListener("click", upload);
  $("job-form").addEventListener("submit", createJob);
  const betaFor = () => { $("job-beta").disabled = $("job-type").value === "supervised"; };  // DPO's and ORPO's
  $("job-type").addEventListener("change", betaFor);
  betaFor();
  $("cancel-job").addEventListener("click", cancelJob);
  $("chat-send").addEventListener("click", sendChat);
  $("chat-clear").addEventListener("click", () => { state.chat = []; renderChat(); });
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); sendChat(); }
  });
  tick(); slowTick();
  setInterval(tick, POLL_MS);
  setInterval(slowTick, 2 * POLL_MS);
});
