// The page at /: pick a model, drop an image, see the top 5 and the class activation map of a chosen class.
// It calls the server's KServe v2 REST API with Triton's binary tensor extension: the image goes as a BYTES
// tensor (the server decodes and resizes it as the model's preprocessing says), the CAM comes back as FP32.
// The token lives in this page's memory only (the field's value): never stored, never put in a URL.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { image: null, bitmap: null, top: [], cam: null, camClass: null, shape: null };
const HEADER_LENGTH = "Inference-Header-Content-Length";

function headers(extra) {
  const h = Object.assign({}, extra);
  const token = $("token").value.trim();
  if (token) h.Authorization = "Bearer " + token;
  return h;
}

function status(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function call(path, init) {
  const response = await fetch(path, Object.assign({}, init, { headers: headers(init && init.headers) }));
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

async function loadModels() {
  try {
    const meta = await (await call("v2")).json();
    $("server").textContent = meta.name + " " + meta.version;
    const index = await (await call("v2/repository/index", { method: "POST", body: '{"ready": true}',
      headers: { "Content-Type": "application/json" } })).json();
    const names = [...new Set(index.map((m) => m.name))].sort();
    const select = $("model");
    const before = select.value;
    select.replaceChildren(...names.map((n) => new Option(n, n)));
    if (names.includes(before)) select.value = before;
    status(names.length ? "Ready: drop an image." : "The server has no ready model.", !names.length);
  } catch (e) {
    status("Cannot list the models: " + e.message, true);
  }
}

// The REST body: the JSON header, then the binary inputs (BYTES: a 4-byte little-endian length, then the bytes).
function inferBody(imageBytes, outputs) {
  const header = new TextEncoder().encode(JSON.stringify({
    inputs: [{ name: state.inputName, datatype: "BYTES", shape: [1],
      parameters: { binary_data_size: imageBytes.byteLength + 4 } }],
    outputs,
  }));
  const length = new Uint8Array(4);
  new DataView(length.buffer).setUint32(0, imageBytes.byteLength, true);
  return { body: new Blob([header, length, imageBytes]), headerLength: header.byteLength };
}

// A REST answer as {name: {datatype, shape, data | bytes}}.
async function outputsOf(response) {
  const buffer = await response.arrayBuffer();
  const n = Number(response.headers.get(HEADER_LENGTH) || buffer.byteLength);
  const answer = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 0, n)));
  const out = {};
  let offset = n;
  for (const o of answer.outputs) {
    const size = o.parameters && o.parameters.binary_data_size;
    if (size !== undefined) {
      o.bytes = buffer.slice(offset, offset + size);
      offset += size;
    }
    out[o.name] = o;
  }
  return out;
}

async function infer(outputs) {
  const model = $("model").value;
  const { body, headerLength } = inferBody(state.image, outputs);
  const response = await call("v2/models/" + encodeURIComponent(model) + "/infer", {
    method: "POST", body, headers: { "Content-Type": "application/octet-stream", [HEADER_LENGTH]: String(headerLength) },
  });
  return outputsOf(response);
}

async function inputName() {
  const meta = await (await call("v2/models/" + encodeURIComponent($("model").value))).json();
  state.inputName = meta.inputs[0].name;
  state.hasCam = meta.outputs.some((o) => o.name === "cam");
}

async function classify(file) {
  if (!file) return;
  if (!$("model").value) { status("No model to ask.", true); return; }
  status("Classifying " + file.name + " ...");
  try {
    state.image = new Uint8Array(await file.arrayBuffer());
    state.bitmap = await createImageBitmap(file);
    state.fileName = file.name;
    await inputName();
    const outputs = [{ name: "probabilities", parameters: { classification: 5 } }];
    if (state.hasCam) outputs.push({ name: "cam", parameters: { binary_data: true } });
    const out = await infer(outputs);
    // Triton's classification strings: "score:index:label".
    state.top = out.probabilities.data.map((s) => {
      const [score, index, ...label] = s.split(":");
      return { score: Number(score), index: Number(index), label: label.join(":") || "class " + index };
    });
    setCam(out.cam);
    render();
    status("");
  } catch (e) {
    status(e.message, true);
  }
}

function setCam(cam) {
  if (!cam) { state.cam = null; state.camClass = null; return; }
  const view = new DataView(cam.bytes);
  const values = new Float32Array(cam.bytes.byteLength / 4);
  for (let i = 0; i < values.length; i++) values[i] = view.getFloat32(i * 4, true);
  state.cam = values;
  state.shape = cam.shape.slice(-2);
  state.camClass = Number(String(cam.parameters.cam_class).split(",")[0]);
}

async function explain(index) {
  if (!state.hasCam) return;
  status("Explaining ...");
  try {
    const out = await infer([{ name: "cam", parameters: { binary_data: true, cam_class: index } }]);
    setCam(out.cam);
    render();
    status("");
  } catch (e) {
    status(e.message, true);
  }
}

function render() {
  $("result").hidden = false;
  const top = $("top");
  top.replaceChildren(...state.top.map((p) => {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.index = p.index;
    b.setAttribute("aria-pressed", String(p.index === state.camClass));
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = p.label;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = (100 * p.score).toFixed(1) + "%";
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = (100 * p.score).toFixed(1) + "%";
    bar.append(fill);
    b.append(label, score, bar);
    b.addEventListener("click", () => explain(p.index));
    li.append(b);
    return li;
  }));
  const shown = state.top.find((p) => p.index === state.camClass);
  $("caption").textContent = state.fileName + (shown ? " · heatmap: " + shown.label : "");
  draw();
}

// Blue (cold) to red (hot), like the heatmaps of the project's CLI.
function colour(v) {
  const r = Math.max(0, Math.min(1, 1.5 - Math.abs(4 * v - 3)));
  const g = Math.max(0, Math.min(1, 1.5 - Math.abs(4 * v - 2)));
  const b = Math.max(0, Math.min(1, 1.5 - Math.abs(4 * v - 1)));
  return [255 * r, 255 * g, 255 * b];
}

function draw() {
  const canvas = $("view");
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(state.bitmap, 0, 0, canvas.width, canvas.height);
  canvas.dataset.camClass = state.camClass === null ? "" : String(state.camClass);
  if (!state.cam || !$("overlay").checked) return;
  const [h, w] = state.shape;
  const heat = document.createElement("canvas");
  heat.width = w;
  heat.height = h;
  const pixels = heat.getContext("2d").createImageData(w, h);
  for (let i = 0; i < w * h; i++) {
    const [r, g, b] = colour(state.cam[i]);
    pixels.data.set([r, g, b, 150], 4 * i);
  }
  heat.getContext("2d").putImageData(pixels, 0, 0);
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(heat, 0, 0, canvas.width, canvas.height);
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => classify(e.target.files[0]));
  for (const kind of ["dragenter", "dragover"]) {
    drop.addEventListener(kind, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const kind of ["dragleave", "drop"]) {
    drop.addEventListener(kind, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => { e.preventDefault(); classify(e.dataTransfer.files[0]); });
  $("overlay").addEventListener("change", draw);
  $("token").addEventListener("change", loadModels);
  $("model").addEventListener("change", () => { $("result").hidden = true; });
  loadModels();
}

setUp();
