// The playground page: tabs for the pages that apply to the run, forms that ask the server for
// a generation, and the picture refreshed from the stream of frames it sends back.
"use strict";

// Small pictures are enlarged by a whole factor (pixels stay square) up to these widths.
const OUTPUT_WIDTH = 512;
const PREVIEW_WIDTH = 200;
const running = new Map(); // page name -> AbortController of its generation

function element(selector, root = document) {
  return root.querySelector(selector);
}

// One line for any refused request: the server's {"error": ...}, else the status.
async function errorLine(response) {
  try {
    const body = await response.json();
    if (body.error) return body.error;
  } catch (err) {
    // not JSON: fall through
  }
  return `the server answered ${response.status} ${response.statusText}`;
}

function enlarge(img, width) {
  const zoom = Math.max(1, Math.floor(width / img.naturalWidth));
  img.width = img.naturalWidth * zoom;
}

function showFacts(info) {
  const facts = [
    ["run", info.run],
    ["preset", info.preset],
    ["data", info.data],
    ["images", info.image_shape.join("×")],
    ["attention", info.attention],
    ["output", info.output],
    ["parameters", info.parameters.toLocaleString("en")],
    ["classes", info.num_classes || null],
    ["super-resolution", info.scale ? `×${info.scale} from ${info.low_res_shape.join("×")}` : null],
    ["test bits/dim", info.test_bits_per_dim === null ? null : info.test_bits_per_dim.toFixed(4)],
    ["device", info.device],
  ];
  const list = element("#facts");
  for (const [name, value] of facts) {
    if (value === null || value === undefined) continue;
    const group = document.createElement("div");
    const term = document.createElement("dt");
    const detail = document.createElement("dd");
    term.textContent = name;
    detail.textContent = value;
    group.append(term, detail);
    list.append(group);
  }
  const notes = [];
  if (info.task === "superres") {
    notes.push(
      "This is a super-resolution model: it draws images for a low-resolution input, so " +
        "sampling is upscaling here (the Upscale page).",
    );
  }
  if (!info.test_images) notes.push(info.no_test_images);
  if (notes.length) {
    element("#notes").textContent = notes.join(" ");
    element("#notes").hidden = false;
  }
}

function showPage(name) {
  for (const tab of document.querySelectorAll("[role=tab]")) {
    const selected = tab.dataset.page === name;
    tab.setAttribute("aria-selected", String(selected));
    element(`#page-${tab.dataset.page}`).hidden = !selected;
  }
}

function setUpTabs(info) {
  for (const name of info.pages) {
    const tab = element(`#tab-${name}`);
    tab.parentElement.append(tab); // in the order of info.pages
    tab.hidden = false;
    tab.addEventListener("click", () => {
      history.replaceState(null, "", `#${name}`);
      showPage(name);
    });
  }
  const asked = location.hash.slice(1);
  showPage(info.pages.includes(asked) ? asked : info.pages[0]);
}

function setStatus(result, state, text) {
  result.dataset.state = state;
  element(".status", result).textContent = text;
  element(".stop", result).disabled = state !== "running";
}

// Server-sent events from a fetch response: onEvent(kind, data) for each event with data, to
// the end of the response.
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end = buffer.indexOf("\n\n");
    while (end >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let kind = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data.push(line.slice(6));
      }
      if (data.length) onEvent(kind, JSON.parse(data.join("\n")));
      end = buffer.indexOf("\n\n");
    }
  }
}

function parameters(form) {
  const params = new URLSearchParams(new FormData(form));
  params.set("page", form.dataset.page);
  const source = params.get("source");
  params.delete("source");
  if (source === "upload") {
    params.delete("index");
    if (!form.dataset.upload) throw new Error("choose an image file to upload first");
    params.set("upload", form.dataset.upload);
  }
  return params;
}

// One generation: a fetch of the event stream; aborting it (Stop, a new generation, closing
// the tab) ends the stream, and the server cancels the work.
async function generate(form, result) {
  const name = form.dataset.page;
  running.get(name)?.abort();
  let params;
  try {
    params = parameters(form);
  } catch (err) {
    setStatus(result, "error", err.message);
    return;
  }
  const controller = new AbortController();
  running.set(name, controller);
  const progress = element("progress", result);
  const output = element(".output", result);
  progress.value = 0;
  setStatus(result, "running", "starting…");
  let ended = false;
  try {
    const response = await fetch(`/api/stream?${params}`, { signal: controller.signal });
    if (!response.ok) {
      setStatus(result, "error", await errorLine(response));
      return;
    }
    await readEvents(response, (kind, data) => {
      if (kind === "frame") {
        output.src = data.image;
        output.hidden = false;
        progress.value = data.step / data.total;
        setStatus(result, "running", `step ${data.step} of ${data.total}`);
      } else if (kind === "done") {
        ended = true;
        setStatus(result, "done", `done in ${data.seconds.toFixed(1)} s`);
      } else if (kind === "error") {
        ended = true;
        setStatus(result, "error", data.message);
      } else if (kind === "cancelled") {
        ended = true;
        setStatus(result, "stopped", `stopped by the server after step ${data.steps}`);
      }
    });
    if (!ended) setStatus(result, "error", "the server closed the stream before the end");
  } catch (err) {
    if (running.get(name) !== controller) return; // replaced by a newer generation
    if (err.name === "AbortError") setStatus(result, "stopped", "stopped");
    else setStatus(result, "error", `lost the connection to the server (${err.message})`);
  } finally {
    if (running.get(name) === controller) running.delete(name);
    controller.abort(); // closes the stream if it is still open
  }
}

function showTestImage(form, preview, note) {
  const index = element("[name=index]", form).value;
  preview.src = `/api/test-image?index=${encodeURIComponent(index)}&page=${form.dataset.page}`;
  note.textContent =
    form.dataset.page === "upscale" ? `test image ${index}: input, truth` : `test image ${index}`;
  note.classList.remove("error");
}

async function upload(form, file, preview, note) {
  delete form.dataset.upload;
  preview.hidden = true;
  note.textContent = "uploading…";
  note.classList.remove("error");
  const body = new FormData();
  body.append("file", file);
  let response;
  try {
    response = await fetch(`/api/upload?page=${form.dataset.page}`, { method: "POST", body });
  } catch (err) {
    note.textContent = `the upload failed (${err.message})`;
    note.classList.add("error");
    return;
  }
  if (!response.ok) {
    note.textContent = await errorLine(response);
    note.classList.add("error");
    return;
  }
  const answer = await response.json();
  form.dataset.upload = answer.id;
  preview.src = answer.preview;
  note.textContent = `${file.name}: ${answer.note}`;
}

function setUpSource(form, info) {
  const preview = element(".preview", form);
  const note = element(".source-note", form);
  const index = element("[name=index]", form);
  const fileInput = element(".file", form);
  const radio = (value) => element(`[name=source][value=${value}]`, form);
  preview.addEventListener("load", () => {
    preview.hidden = false;
    enlarge(preview, PREVIEW_WIDTH);
  });
  preview.addEventListener("error", () => {
    preview.hidden = true;
  });
  index.max = Math.max(0, info.test_images - 1);
  if (!info.test_images) {
    radio("test").disabled = true;
    index.disabled = true;
    radio("upload").checked = true;
    note.textContent = info.no_test_images;
  } else {
    showTestImage(form, preview, note);
  }
  index.addEventListener("input", () => {
    radio("test").checked = true;
    showTestImage(form, preview, note);
  });
  radio("test").addEventListener("change", () => showTestImage(form, preview, note));
  fileInput.addEventListener("change", () => {
    if (!fileInput.files.length) return;
    radio("upload").checked = true;
    upload(form, fileInput.files[0], preview, note);
  });
}

function setUpForm(form, info) {
  const name = form.dataset.page;
  const defaults = info.defaults[name];
  const count = element("[name=n]", form);
  count.value = defaults.n;
  count.max = info.max_n;
  element("[name=temperature]", form).value = defaults.temperature;
  const keep = element("[name=keep]", form);
  if (keep) {
    const shown = element(".kept", form);
    keep.value = defaults.keep;
    const update = () => (shown.textContent = `${Math.round(keep.value * 100)}%`);
    keep.addEventListener("input", update);
    update();
  }
  const classes = element(".classes", form);
  if (classes && info.num_classes) {
    const select = element("select", classes);
    for (let k = 0; k < info.num_classes; k++) select.add(new Option(`class ${k}`, String(k)));
    classes.hidden = false;
  }
  const guidance = element(".guidance", form);
  if (guidance && info.guidance !== null) {
    // a class-dropout model: classifier-free guidance, 0 for plain p(x | y)
    const weight = element("input", guidance);
    weight.value = info.guidance;
    weight.max = info.max_guidance;
    weight.disabled = false;
    guidance.hidden = false;
  }
  if (element(".source", form)) setUpSource(form, info);
  const result = element(`#page-${name} .result`);
  const output = element(".output", result);
  output.addEventListener("load", () => enlarge(output, OUTPUT_WIDTH));
  element(".stop", result).addEventListener("click", () => running.get(name)?.abort());
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    generate(form, result);
  });
}

async function main() {
  let info;
  try {
    const response = await fetch("/api/info");
    if (!response.ok) throw new Error(await errorLine(response));
    info = await response.json();
  } catch (err) {
    element("#notes").textContent = `cannot reach the playground's server (${err.message})`;
    element("#notes").hidden = false;
    return;
  }
  showFacts(info);
  for (const form of document.querySelectorAll("form[data-page]")) {
    if (info.pages.includes(form.dataset.page)) setUpForm(form, info);
  }
  setUpTabs(info);
  document.body.dataset.ready = "true";
}

main();
