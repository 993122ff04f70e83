// The sealserve playground: plain JavaScript, no build step, no third-party code.
// The key lives in sessionStorage only (this tab); every call goes to this origin.
"use strict";

const KEY_STORAGE = "sealserve.apiKey";
const $ = (id) => document.getElementById(id);
let running = null; // the AbortController of the generation in progress
const objectUrls = [];

function key() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function status(message, ok = false) {
  $("status").textContent = message;
  $("status").className = ok ? "ok" : "";
}

function headers(extra = {}) {
  return { Authorization: "Bearer " + key(), "Content-Type": "application/json", ...extra };
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error.message}`;
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}

function pngBlobUrl(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const url = URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
  objectUrls.push(url);
  return url;
}

function releaseUrls() {
  while (objectUrls.length) URL.revokeObjectURL(objectUrls.pop());
}

async function loadModels() {
  if (!key()) {
    status("Paste an API key (or a token) and press \"Use key\".");
    return;
  }
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    status(await errorMessage(response));
    return;
  }
  const { models } = await response.json();
  for (const [select, kind] of [[$("model"), "text-to-image"], [$("classifier"), "image-classification"]]) {
    select.replaceChildren();
    for (const model of models.filter((m) => m.kind === kind && m.status !== "error")) {
      select.append(new Option(model.name, model.id));
    }
  }
  status(`${models.length} models available.`, true);
}

// Server-sent events from a fetch body: calls onEvent(name, data) for each complete event.
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) onEvent(name, JSON.parse(data));
    }
  }
}

function showProgress(event) {
  const bar = $("progress");
  bar.max = event.total_steps;
  bar.value = event.step;
  bar.dataset.updates = String(Number(bar.dataset.updates || "0") + 1);
  $("progress-text").textContent = `step ${event.step} of ${event.total_steps}`;
  if (event.preview) {
    const img = $("previews").querySelector(`[data-index="${event.image_index}"]`) || new Image();
    img.dataset.index = event.image_index;
    img.alt = `preview of image ${event.image_index + 1}`;
    img.src = "data:image/png;base64," + event.preview;
    $("previews").append(img);
  }
}

function showResult(result) {
  releaseUrls();
  $("previews").replaceChildren();
  $("results").replaceChildren();
  for (const image of result.images) {
    const url = pngBlobUrl(image.base64);
    const figure = document.createElement("figure");
    const img = new Image();
    img.src = url;
    img.alt = `${result.prompt} (seed ${image.seed})`;
    img.className = "result";
    const link = document.createElement("a");
    link.href = url;
    link.download = `sealserve-${image.seed}.png`;
    link.textContent = `Download PNG (seed ${image.seed})`;
    const caption = document.createElement("figcaption");
    caption.append(link);
    figure.append(img, caption);
    $("results").append(figure);
  }
  status(`Generated ${result.images.length} image(s) in ${result.processing_time}s.`, true);
}

async function generate(event) {
  event.preventDefault();
  if (running) return;
  const count = Number($("count").value);
  const body = {
    id: "playground-" + Date.now(),
    model_id: $("model").value,
    prompt: $("prompt").value,
    width: Number($("width").value),
    height: Number($("height").value),
    num_inference_steps: Number($("steps").value),
    num_images: count,
  };
  if ($("negative").value) body.negative_prompt = $("negative").value;
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  running = new AbortController();
  $("run").disabled = true;
  $("stop").disabled = false;
  $("progress").value = 0;
  $("progress").dataset.updates = "0";
  $("previews").replaceChildren();
  status("Generating ...", true);
  try {
    const response = await fetch("/v1/infer?previews=4", {
      method: "POST",
      headers: headers({ Accept: "text/event-stream" }),
      body: JSON.stringify(body),
      signal: running.signal,
    });
    if (!response.ok) {
      status(await errorMessage(response));
      return;
    }
    await readEvents(response, (name, data) => {
      if (name === "progress") showProgress(data);
      else if (name === "result") showResult(data);
      else if (name === "error") status(data.error.message);
    });
  } catch (error) {
    status(error.name === "AbortError" ? "Stopped." : String(error));
  } finally {
    running = null;
    $("run").disabled = false;
    $("stop").disabled = true;
  }
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function classify(file) {
  if (!file) return;
  const dataUrl = await readFile(file);
  $("classify-image").src = dataUrl;
  $("classify-image").hidden = false;
  const body = { image: dataUrl, filename: file.name.slice(0, 255), top_k: 5 };
  if ($("classifier").value) body.model_id = $("classifier").value;
  const response = await fetch("/v1/classify", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!response.ok) {
    status(await errorMessage(response));
    return;
  }
  const { predictions } = await response.json();
  $("predictions").replaceChildren();
  for (const p of predictions) {
    const item = document.createElement("li");
    const bar = document.createElement("progress");
    bar.max = 1;
    bar.value = p.confidence;
    item.append(p.label, bar, `${(p.confidence * 100).toFixed(1)}%`);
    $("predictions").append(item);
  }
  status("Classified.", true);
}

function selectTab(name) {
  for (const tab of document.querySelectorAll(".tab")) {
    const selected = tab.dataset.tab === name;
    tab.setAttribute("aria-selected", String(selected));
    $(tab.dataset.tab).hidden = !selected;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("key").value = key();
  $("connect").addEventListener("click", () => {
    sessionStorage.setItem(KEY_STORAGE, $("key").value.trim());
    loadModels();
  });
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => selectTab(tab.dataset.tab));
  }
  $("generate-form").addEventListener("submit", generate);
  $("stop").addEventListener("click", () => running && running.abort());
  $("file").addEventListener("change", () => classify($("file").files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    classify(e.dataTransfer.files[0]);
  });
  loadModels();
});
