// The web page: one form over the job API (POST /jobs, then server-sent events for the live preview).
"use strict";
const $ = (id) => document.getElementById(id);
let config = null, job = null, picture = null;
const apiKey = () => localStorage.getItem("unnoise-key") || "";

async function api(path, options = {}) {
  const headers = { "Content-Type": "application/json", ...(options.headers || {}) };
  if (apiKey()) headers.Authorization = "Bearer " + apiKey();
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    const key = prompt("This server needs its API key:");
    if (key) { localStorage.setItem("unnoise-key", key); return api(path, options); }
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function mode() { return document.querySelector("input[name=mode]:checked").value; }

function showMode() {
  $("edit").hidden = mode() === "txt2img";
  $("paint").hidden = mode() !== "inpaint";
  $("mask").hidden = mode() !== "inpaint";  // img2img shows the picture alone: a thumbnail of its input
  $("size").hidden = mode() !== "txt2img";  // an edit keeps its image's size
}

function setStatus(text, error = false) { $("status").textContent = text; $("status").className = error ? "error" : ""; }

async function start() {
  config = await (await fetch("/config")).json();
  $("model").textContent = `${config.model}, ${config.resolution}x${config.resolution}`;
  const defaults = config.defaults;  // the library's ImageSettings defaults
  for (const name of config.samplers) {  // shown by the label captions and PNGs use ("DPM++ 2M"), sent by name
    const label = config.sampler_labels[name] || name, chosen = name === defaults.sampler;
    $("sampler").add(new Option(label, name, chosen, chosen));
  }
  $("steps").value = defaults.steps;
  $("guidance").value = defaults.guidance; $("bind").checked = defaults.bind_attributes;
  $("steps").max = config.max_steps; $("count").max = config.max_images;  // the server's bounds
  for (const side of ["width", "height"]) $(side).value = config.resolution;  // other sizes: rounded by the server, which says so
  $("size").title = `up to ${config.size_rule}`;
  document.querySelectorAll("input[name=mode]").forEach((r) => r.addEventListener("change", showMode));
  $("file").addEventListener("change", loadPicture);
  $("clear").addEventListener("click", clearMask);
  $("form").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
  $("cancel").addEventListener("click", () => job && api(`/jobs/${job.id}`, { method: "DELETE", headers: owner(job) }));
  paintable($("mask"));
  showMode();
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", restoreFromDrop);
  for (const batch of history()) showBatch(batch, false);  // newest first, as they were
}

// --- history: the gallery is kept in this browser across reloads (the newest HISTORY images) ---------
const HISTORY = 64;
function history() { try { return JSON.parse(localStorage.getItem("unnoise-history") || "[]"); } catch { return []; } }
function remember(batch) {
  const batches = [batch, ...history()];
  let images = 0, kept = [];
  for (const b of batches) { if (images + b.images.length > HISTORY) break; kept.push(b); images += b.images.length; }
  try { localStorage.setItem("unnoise-history", JSON.stringify(kept)); } catch { /* storage full: keep the page */ }
}

// --- a PNG dropped on the page restores the settings it carries (its parameters text); dropped on the
// image of an edit, it is that image ----------------------------------------------------------------------
async function restoreFromDrop(e) {
  e.preventDefault();
  const file = e.dataTransfer.files[0];
  if (!file) return;
  if (mode() !== "txt2img" && $("edit").contains(e.target)) { showPicture(URL.createObjectURL(file)); return; }
  const data = await new Promise((done) => { const r = new FileReader(); r.onload = () => done(r.result); r.readAsDataURL(file); });
  try {
    const info = await api("/sdapi/v1/png-info", { method: "POST", body: JSON.stringify({ image: data }) });
    if (!info.settings) throw new Error("this PNG carries no unnoise or AUTOMATIC1111 settings");
    const s = info.settings;
    $("prompt").value = s.prompt; $("negative").value = s.negative_prompt; $("sampler").value = s.sampler;
    $("steps").value = s.steps; $("guidance").value = s.guidance; $("seed").value = s.seed; $("random").checked = false;
    $("bind").checked = s.bind_attributes;
    if (s.width && s.height) { $("width").value = s.width; $("height").value = s.height; }
    setStatus(`settings restored from ${file.name}`);
  } catch (error) { setStatus(error.message, true); }
}

function seedOf(parameters) { return +((parameters.match(/Seed: (\d+)/) || [])[1] || 0); }

function sendTo(target, src) {
  document.querySelector(`input[name=mode][value=${target}]`).checked = true;
  showMode();
  showPicture(src);
  window.scrollTo(0, 0);
}

function loadPicture() {
  const file = $("file").files[0];
  if (file) showPicture(URL.createObjectURL(file));
}

function showPicture(src) {
  const image = new Image();
  image.onload = () => drawPicture(image);
  image.src = src;
}

function drawPicture(image) {
  $("canvases").hidden = false;
  for (const canvas of [$("picture"), $("mask")]) { canvas.width = image.width; canvas.height = image.height; }
  $("picture").getContext("2d").drawImage(image, 0, 0);
  clearMask();
  picture = $("picture").toDataURL("image/png");
}

function clearMask() {
  const c = $("mask"), g = c.getContext("2d");
  g.fillStyle = "black"; g.fillRect(0, 0, c.width, c.height);
}

function paintable(canvas) {
  let down = false;
  const paint = (e) => {
    if (!down) return;
    const box = canvas.getBoundingClientRect(), g = canvas.getContext("2d");
    const x = (e.clientX - box.left) * canvas.width / box.width, y = (e.clientY - box.top) * canvas.height / box.height;
    const r = $("brush").value * canvas.width / 256;
    g.fillStyle = "white"; g.beginPath(); g.arc(x, y, r, 0, 2 * Math.PI); g.fill();
  };
  canvas.addEventListener("pointerdown", (e) => { down = true; canvas.setPointerCapture(e.pointerId); paint(e); });
  canvas.addEventListener("pointermove", paint);
  window.addEventListener("pointerup", () => { down = false; });
}

function request() {
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative").value, sampler_name: $("sampler").value,
    steps: +$("steps").value, batch_size: +$("count").value,
    seed: $("random").checked ? -1 : +$("seed").value, bind_attributes: $("bind").checked,
  };
  if ($("guidance").value !== "") body.cfg_scale = +$("guidance").value;  // empty: the model's default
  if (mode() === "txt2img") { body.width = +$("width").value; body.height = +$("height").value; }
  if (mode() !== "txt2img") {
    if (!picture) throw new Error("choose an image first");
    body.init_images = [picture];
    body.denoising_strength = +$("strength").value;
  }
  if (mode() === "inpaint") body.mask = $("mask").toDataURL("image/png");
  return body;
}

async function generate() {
  let created;
  try { created = await api("/jobs", { method: "POST", body: JSON.stringify(request()) }); }
  catch (error) { setStatus(error.message, true); return; }
  job = { id: created.id, token: created.token };  // the token shows the server the job is ours
  $("generate").disabled = true; $("cancel").disabled = false;
  setStatus("queued");
  watch(job);
}

function owner(job) { return { "X-Job-Token": job.token }; }

// Server-sent events read through fetch, so the API key and the job's token can go in headers (EventSource
// cannot send any).
async function watch(job) {
  const headers = apiKey() ? { Authorization: "Bearer " + apiKey(), ...owner(job) } : owner(job);
  const response = await fetch(`/jobs/${job.id}/events`, { headers });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end); buffer = buffer.slice(end + 2);
      const event = (block.match(/^event: (.*)$/m) || [])[1], data = (block.match(/^data: (.*)$/m) || [])[1];
      if (!data) continue;
      const s = JSON.parse(data);
      if (event === "progress") {
        if (s.preview) $("preview").src = "data:image/png;base64," + s.preview;
        $("progress").value = s.progress;
        const asked = +$("steps").value, repaint = mode() === "inpaint" && s.total_steps > asked;
        const why = repaint ? ` (RePaint goes back and forth over your ${asked} steps to blend the edit)` : "";
        setStatus(`${s.state}: step ${s.step} of ${s.total_steps}${why}`);
      } else { finish(event, s); return; }
    }
  }
}

function finish(state, result) {
  $("generate").disabled = false; $("cancel").disabled = true;
  $("progress").value = state === "done" ? 1 : 0;
  if (state !== "done") { setStatus(result.error || state, state === "failed"); return; }
  const notes = Object.values(result.notes || {});  // e.g. the size made when another was asked for
  setStatus([`done: ${result.images.length} image(s)`, ...notes].join("; "));
  const batch = { id: result.id, images: result.images, parameters: result.parameters };
  showBatch(batch, true);
  remember(batch);
  $("preview").src = "data:image/png;base64," + result.images[0];
}

// One group a request, newest first; inside it the images in seed order, at their own aspect ratio.
function showBatch(batch, newest) {
  const group = document.createElement("div");
  group.className = "batch";
  batch.images.forEach((data, i) => {
    const figure = document.createElement("figure"), img = new Image(), link = document.createElement("a");
    const parameters = batch.parameters[i];
    img.src = "data:image/png;base64," + data; img.alt = parameters;
    link.href = img.src; link.download = `unnoise-${batch.id}-${i}.png`; link.title = "download the PNG (its settings inside)";
    link.appendChild(img);
    const tools = document.createElement("div");
    tools.className = "tools";
    const button = (label, action) => { const b = document.createElement("button"); b.type = "button"; b.textContent = label; b.onclick = action; tools.append(b); };
    button("reuse seed", () => { $("seed").value = seedOf(parameters); $("random").checked = false; });
    button("img2img", () => sendTo("img2img", img.src));
    button("inpaint", () => sendTo("inpaint", img.src));
    const caption = document.createElement("figcaption"); caption.textContent = parameters;
    figure.append(link, tools, caption);
    group.append(figure);
  });
  if (newest) $("gallery").prepend(group); else $("gallery").append(group);
}

start();
