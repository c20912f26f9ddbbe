// qforge dashboard: plain JS over the OpenAI-compatible API of the same server. It polls; it
// never builds HTML from data (textContent only), so job names and messages cannot inject markup.
"use strict";

const POLL_MS = 1500;
const KEY_NAME = "qforge.apiKey";
const state = { key: "", selected: null, jobs: [], models: [], chat: [], busy: false, chatPicked: false };
const $ = (id) => document.getElementById(id);

// The API key: from ?key= (then taken out of the address bar, so it is not left in the history or a
// bookmark), else from this tab's sessionStorage, else from localStorage ("remember" ticked).
function loadKey() {
  const url = new URL(window.location.href);
  const given = url.searchParams.get("key");
  if (given !== null) {
    url.searchParams.delete("key");
    window.history.replaceState(null, "", url.pathname + url.search + url.hash);
    sessionStorage.setItem(KEY_NAME, given.trim());
    return given.trim();
  }
  return sessionStorage.getItem(KEY_NAME) || localStorage.getItem(KEY_NAME) || "";
}

function saveKey(key, remember) {
  sessionStorage.setItem(KEY_NAME, key);
  if (remember) localStorage.setItem(KEY_NAME, key); else localStorage.removeItem(KEY_NAME);
  showKeyWhere();
}

function showKeyWhere() {
  const remembered = !!localStorage.getItem(KEY_NAME);
  $("remember-key").checked = remembered;
  $("key-where").textContent = !state.key ? "No key entered. Paste one above or open this page as /?key=YOUR_KEY."
    : remembered ? "The key is kept in this browser's localStorage (untick 'remember' and press Use to forget it)."
    : "The key is kept in this tab's sessionStorage only: it is gone when the tab closes.";
}

// the key state shown above the page: ok (hidden), missing, rejected (401/403) or error (no server)
function setKeyState(kind, message) {
  const banner = $("key-state");
  banner.dataset.state = kind;
  banner.hidden = kind === "ok";
  banner.textContent = message || "";
  const locked = kind !== "ok";
  $("jobs-locked").hidden = !locked;
  if (locked) {
    $("jobs").querySelector("tbody").replaceChildren();
    $("jobs-empty").hidden = true;
    state.jobs = [];
  }
  $("server-status").textContent = kind === "ok" ? "connected" : kind === "rejected" ? "key not accepted"
    : kind === "missing" ? "enter the API key" : "no connection";
}

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
function duration(seconds) {
  seconds = Math.max(0, Math.round(seconds));
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  return h ? `${h}h ${m}m ${s}s` : m ? `${m}m ${s}s` : `${s}s`;
}
const ACTIVE = ["validating_files", "queued", "running"];
const CHECKPOINT = /:ckpt-step-[0-9]+$/;
function setStatus(id, text, isError) {
  const node = $(id);
  node.textContent = text;
  node.className = "status-line" + (isError ? " error" : "");
}

// ---- jobs list ------------------------------------------------------------------------------
async function refreshJobs() {
  const page = await api("/fine_tuning/jobs?limit=100");
  setKeyState("ok");
  state.jobs = page.data;
  const body = $("jobs").querySelector("tbody");
  body.replaceChildren(...state.jobs.map((job) => {
    const row = el("tr", { dataset: { jobId: job.id }, class: job.id === state.selected ? "selected" : "" },
      el("td", { class: "mono", title: job.id }, job.id),
      el("td", {}, el("span", { class: "badge status " + job.status }, job.status)),
      modelCell(job),
      el("td", {}, when(job.created_at)));
    row.addEventListener("click", () => {
      state.selected = job.id; state.chatPicked = false; refreshJobs(); refreshDetail();
    });
    return row;
  }));
  $("jobs-empty").hidden = state.jobs.length > 0;
}

// one rule for every job: the fine-tuned model's name once it exists, else the base it trains, labelled
function modelCell(job) {
  const tuned = !!job.fine_tuned_model;
  return el("td", { class: "mono model", title: tuned ? "the fine-tuned model" : "the base model this job trains" },
    el("span", { class: "model-label" }, tuned ? "fine-tuned" : "base"), tuned ? job.fine_tuned_model : job.model);
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
  $("copy-id").hidden = !jobId;
  if (!jobId) return;
  const [job, events, checkpoints] = await Promise.all([
    api(`/fine_tuning/jobs/${jobId}`), allEvents(jobId), api(`/fine_tuning/jobs/${jobId}/checkpoints?limit=100`)]);
  if (state.selected !== jobId) return;
  state.job = job;
  const metrics = events.filter((e) => e.type === "metrics" && e.data);
  $("detail-status").textContent = job.status;
  $("detail-status").className = "status " + job.status;
  const active = ACTIVE.includes(job.status);
  $("detail-model").textContent = job.fine_tuned_model || (active ? `(when it succeeds; base ${job.model})`
                                                                   : `none (base ${job.model})`);
  const type = (job.method && job.method.type) || "supervised";
  const hp = (job.method && job.method[type] && job.method[type].hyperparameters) || {};
  const batch = hp.batch_size ?? job.hyperparameters.batch_size;
  const objective = type === "supervised" ? "" : `${type}${hp.beta != null ? " (beta " + hp.beta + ")" : ""}, `;
  $("detail-method").textContent = `${objective}${hp.method || "?"}, rank ${hp.rank ?? "?"}, batch ${batch}`;
  $("detail-tokens").textContent = job.trained_tokens ?? "";
  $("detail-error").hidden = !job.error;
  $("detail-error").textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
  $("cancel-job").hidden = !active;  // a finished job has nothing to cancel
  $("download-adapter").hidden = job.status !== "succeeded" || !job.fine_tuned_model;
  drawLoss(metrics);
  drawLr(metrics);  // before the settings, which show the latest learning rate
  showProgress(job, metrics);
  showSettings(job, type, hp);
  $("events").replaceChildren(...events.slice(-200).reverse().map((e) =>
    el("li", { class: e.level }, el("span", { class: "when" }, when(e.created_at)), e.message)));
  $("checkpoints").querySelector("tbody").replaceChildren(...checkpoints.data.map((c) =>
    el("tr", {}, el("td", {}, c.step_number),
       el("td", {}, c.metrics.train_loss != null ? c.metrics.train_loss.toFixed(4) : ""),
       el("td", { class: "mono", title: c.fine_tuned_model_checkpoint }, c.fine_tuned_model_checkpoint))));
  drawRewards(metrics);
}

// Progress from the metric events (step of total_steps), the time since the job was created (to its
// end once finished), and the server's estimate of the finish. A running job whose last step is
// logged is still saving its adapter and results: it turns "succeeded" when the trainer exits.
function showProgress(job, metrics) {
  const last = metrics.length ? metrics[metrics.length - 1].data : null;
  const total = last && last.total_steps ? last.total_steps : null;
  const step = last ? last.step : 0;
  const done = job.status === "succeeded" ? 1 : total ? Math.min(1, step / total) : 0;
  $("detail-progress").textContent = total ? `step ${step}/${total} (${Math.round(100 * done)}%)`
    : job.status === "succeeded" ? "done (100%)" : "not started (0%)";
  $("progress-bar").style.width = `${(100 * done).toFixed(1)}%`;
  const end = job.finished_at || Date.now() / 1000;
  $("detail-elapsed").textContent = duration(end - job.created_at) + (job.finished_at ? "" : " so far");
  $("detail-eta").textContent = !ACTIVE.includes(job.status) ? "—"
    : job.estimated_finish ? `${duration(job.estimated_finish - Date.now() / 1000)} (about ${when(job.estimated_finish)})`
    : "estimated after two steps";
  const phases = { validating_files: "checking the files", queued: "waiting for the worker",
                   running: total && step >= total ? `all ${total} steps done: saving the adapter and results`
                     : "training" };
  $("detail-phase").textContent = phases[job.status] ? `(${phases[job.status]})` : "";
}

const SETTING_LABELS = {
  method: "method", n_epochs: "epochs", batch_size: "batch size", learning_rate_multiplier: "learning-rate multiplier",
  max_steps: "max steps", max_seq_len: "sequence length (tokens)", rank: "LoRA rank", alpha: "LoRA alpha",
  dropout: "LoRA dropout", target_modules: "target modules", quant_type: "4-bit type", double_quant: "double quantisation",
  save_every: "checkpoint every (steps)", grad_accum: "gradient accumulation", compute_dtype: "compute dtype",
  beta: "beta", label_smoothing: "label smoothing", n_processes: "processes",
};

// every setting the job resolved to (its method's hyperparameters), then its files and seed
function showSettings(job, type, hp) {
  const value = (v) => v === null || v === undefined ? "(default)" : Array.isArray(v) ? v.join(", ") : String(v);
  const lr = state.lastLr != null ? ` (learning rate ${state.lastLr.toExponential(2)} at the last step)` : "";
  const rows = Object.entries(hp).map(([k, v]) => [SETTING_LABELS[k] || k, value(v) + (k === "learning_rate_multiplier" ? lr : "")]);
  rows.unshift(["type", type]);
  rows.push(["training file", job.training_file], ["validation file", job.validation_file || "none"],
            ["seed", value(job.seed)], ["suffix", job.user_provided_suffix || "none"]);
  $("detail-settings").querySelector("tbody").replaceChildren(...rows.map(([k, v]) =>
    el("tr", { dataset: { setting: k } }, el("td", {}, k), el("td", { class: "mono" }, v))));
}

async function downloadAdapter() {
  const job = state.job;
  if (!job || !job.fine_tuned_model) return;
  $("download-status").textContent = "preparing…";
  try {
    const headers = state.key ? { Authorization: "Bearer " + state.key } : {};
    const response = await fetch(`/v1/fine_tuning/jobs/${job.id}/adapter`, { headers });
    if (!response.ok) throw new Error(`${response.status}: ${(await response.json()).error.message}`);
    const blob = await response.blob();
    const link = el("a", { href: URL.createObjectURL(blob), download: job.fine_tuned_model.replaceAll(":", "_") +
                                                                      "-adapter.zip" });
    document.body.append(link);
    link.click();
    link.remove();
    const size = blob.size >= 1e6 ? `${(blob.size / 1e6).toFixed(1)} MB` : `${(blob.size / 1e3).toFixed(1)} kB`;
    $("download-status").textContent = `downloaded ${size}`;
  } catch (e) {
    $("download-status").textContent = "download failed: " + e.message;
  }
}

async function copyId() {
  const id = $("detail-id").textContent;
  try { await navigator.clipboard.writeText(id); $("copy-id").textContent = "copied"; }
  catch (e) { window.getSelection().selectAllChildren($("detail-id")); $("copy-id").textContent = "selected: press Ctrl+C"; }
  setTimeout(() => { $("copy-id").textContent = "copy id"; }, 1500);
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
function drawAxes(axes, box, x0, x1, left, right, format = (v) => v.toFixed(3)) {
  axes.replaceChildren();
  for (const f of [1, 0.5, 0]) {
    const y = left.y(left.y0 + f * (left.y1 - left.y0));
    axes.append(svgNode("line", { x1: box.pad.l, x2: box.W - box.pad.r, y1: y, y2: y }),
                svgNode("text", { x: 2, y: y + 4 }, format(left.y0 + f * (left.y1 - left.y0))));
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
  // a dot per evaluation: one evaluation draws no line
  $("loss-axes").append(...valid.map(([s, v]) => svgNode("circle", { cx: sc.x(s), cy: sc.y(v), r: 3, class: "valid-dot" })));
}

// the learning rate of each step (warm-up, then the schedule's decay)
function drawLr(metrics) {
  const box = { W: 600, H: 140, pad: { l: 60, r: 10, t: 10, b: 22 } };
  const lr = seriesOf(metrics, "learning_rate");
  state.lastLr = lr.length ? lr[lr.length - 1][1] : null;
  if (!lr.length) {
    $("lr-axes").replaceChildren();
    $("lr-line").setAttribute("points", "");
    return;
  }
  const steps = lr.map((p) => p[0]), values = lr.map((p) => p[1]);
  const x0 = Math.min(...steps), x1 = Math.max(x0 + 1, ...steps);
  const sc = scales(box, x0, x1, Math.min(0, ...values), Math.max(...values));
  $("lr-line").setAttribute("points", pointsOf(lr, sc));
  drawAxes($("lr-axes"), box, x0, x1, sc, null, (v) => v.toExponential(1));
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
  if (!state.selected || $("cancel-job").hidden) return;
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
                   save_every: "job-save-every", n_processes: "job-processes" };
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
  const wanted = state.chatPicked && state.models.includes(current) ? current : defaultChatModel();
  select.replaceChildren(...state.models.map((id) => el("option", { value: id, selected: id === wanted }, id)));
}

// The Playground's model until one is picked: the selected job's final model, else the newest job's
// final model, else the base; never a checkpoint alias (those are picked by hand).
function defaultChatModel() {
  const finals = state.jobs.filter((j) => j.fine_tuned_model && state.models.includes(j.fine_tuned_model));
  const chosen = finals.find((j) => j.id === state.selected) || finals[0];
  if (chosen) return chosen.fine_tuned_model;
  return state.models.find((id) => !id.startsWith("ft:")) || state.models.find((id) => !CHECKPOINT.test(id)) || "";
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
    if (e.status === 401 || e.status === 403) {
      setKeyState(state.key ? "rejected" : "missing", state.key
        ? `Key not accepted (HTTP ${e.status}): ${e.message}. Paste a key this server was started with (--api-key or QFORGE_API_KEY).`
        : `This server needs an API key (HTTP ${e.status}). Paste it above or open this page as /?key=YOUR_KEY.`);
    } else if (e.status === undefined) {
      setKeyState("error", "The server cannot be reached: " + e.message);
    } else {
      $("server-status").textContent = "error: " + e.message;
    }
  } finally {
    ticking = false;
  }
}

async function slowTick() {
  try { await Promise.all([refreshModels(), refreshFiles()]); } catch (e) { /* shown by tick */ }
}

document.addEventListener("DOMContentLoaded", () => {
  state.key = loadKey();
  $("api-key").value = state.key;
  showKeyWhere();
  $("save-key").addEventListener("click", () => {
    state.key = $("api-key").value.trim();
    saveKey(state.key, $("remember-key").checked);
    tick(); slowTick();
  });
  $("copy-id").addEventListener("click", copyId);
  $("download-adapter").addEventListener("click", downloadAdapter);
  $("chat-model").addEventListener("change", () => { state.chatPicked = true; });
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
