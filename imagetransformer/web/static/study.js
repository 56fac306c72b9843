// The rater's side of a study: instruction, then one pair at a time. The page never learns
// which image is real; it only sends "left" or "right" for the pair it was given.
"use strict";

const STORAGE_KEY = "imagetransformer-study-rater";
const $ = (id) => document.getElementById(id);
let rater = new URLSearchParams(location.search).get("rater") || localStorage.getItem(STORAGE_KEY);
let current = null;   // the pair on screen
let busy = false;     // an answer is on its way

function show(section) {
  for (const id of ["intro", "task", "finished"]) $(id).hidden = id !== section;
}

function say(text) { $("message").textContent = text || ""; }

function remember(token) {
  rater = token;
  localStorage.setItem(STORAGE_KEY, token);
  const url = new URL(location.href);
  url.searchParams.set("rater", token);
  history.replaceState(null, "", url);
  $("rater-code").textContent = token;
  $("resume-link").textContent = url.href;
}

const NOT_ANSWERING =
  "The server is not answering. Your earlier answers are saved: wait a moment and try again.";

async function call(method, path, body) {
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: body ? { "Content-Type": "application/json" } : {},
      body: body ? JSON.stringify(body) : undefined,
    });
  } catch (err) {   // no answer at all: the server is down or the network is gone
    throw new Error(NOT_ANSWERING);
  }
  const data = await response.json().catch(() => ({ error: `server answered ${response.status}` }));
  if (!response.ok) throw Object.assign(new Error(data.error || response.statusText), { status: response.status });
  return data;
}

function loadImage(img, src) {
  return new Promise((resolve, reject) => {
    img.onload = resolve;
    img.onerror = () => reject(new Error("an image could not be loaded; reload the page"));
    img.src = src;
  });
}

async function render(next) {
  $("progress").textContent = `${next.done} of ${next.total} judged`;
  if (next.finished) { current = null; show("finished"); return; }
  show("task");
  layout();
  current = null;   // until both images are loaded
  setBusy(true);
  await Promise.all([loadImage($("left-image"), next.left), loadImage($("right-image"), next.right)]);
  current = next;
  setBusy(false);
  $("left").focus();
}

// The buttons start disabled (in the HTML) and are enabled only while a pair is on screen with
// both images loaded; #task's data-pair names that pair then, and is absent otherwise.
function setBusy(value) {
  busy = value;
  $("left").disabled = value || !current;
  $("right").disabled = value || !current;
  if (value || !current) delete $("task").dataset.pair;
  else $("task").dataset.pair = current.pair;
}

async function choose(side) {
  if (busy || !current) return;
  setBusy(true);
  say("");
  try {
    await render(await call("POST", "/api/answer", { rater, pair: current.pair, choice: side }));
  } catch (err) {
    if (err.status === 409) {   // answered already (another tab): show what is due now
      try {
        await render(await call("GET", `/api/next?rater=${encodeURIComponent(rater)}`));
        say(/answered already/.test(err.message)
          ? "That pair was already answered in another tab or window, so this answer was not " +
            "counted. Here is the pair that is due now."
          : `${err.message}. Here is the pair that is due now.`);
      } catch (again) {
        say(again.message);
        setBusy(false);
      }
    } else {
      say(err.message);
      setBusy(false);
    }
  }
}

// On a narrow screen the pair wraps, one image above the other: the labels, the buttons'
// names and the arrow keys then say top and bottom (the answer sent is still "left" for the
// first image and "right" for the second).
function layout() {
  const stacked = $("right").offsetTop >= $("left").offsetTop + $("left").offsetHeight;
  $("task").dataset.layout = stacked ? "stacked" : "side";
  $("left").setAttribute("aria-label", `the ${stacked ? "top" : "left"} image came from a camera`);
  $("right").setAttribute("aria-label", `the ${stacked ? "bottom" : "right"} image came from a camera`);
}

async function start() {
  say("");
  try {
    if (!rater) remember((await call("POST", "/api/raters")).rater);
    await render(await call("GET", `/api/next?rater=${encodeURIComponent(rater)}`));
  } catch (err) {
    if (err.status === 404) {   // a token this study does not know: forget it, start afresh
      localStorage.removeItem(STORAGE_KEY);
      rater = null;
      $("rater-code").textContent = "none yet";
      show("intro");
    }
    say(err.message);
  }
}

async function init() {
  const info = await call("GET", "/api/study");
  const [h, w] = info.image_size;
  for (const id of ["left-image", "right-image"]) {
    $(id).width = w * info.display_scale;
    $(id).height = h * info.display_scale;
  }
  $("display-note").textContent =
    `Each image is ${w}x${h} pixels, shown ${info.display_scale} times larger with ` +
    `${info.display_method} scaling (every pixel is drawn as a ${info.display_scale}x` +
    `${info.display_scale} square, nothing is smoothed). There are ${info.images_per_rater} pairs.`;
  $("scaling-note").textContent =
    `Shown ${info.display_scale}x larger, ${info.display_method} (each pixel a square).`;
  if (rater) {
    remember(rater);
    $("start").textContent = "Continue";
  } else {
    $("resume-link").textContent = "(you get one when you start)";
  }
  $("start").addEventListener("click", start);
  $("left").addEventListener("click", () => choose("left"));
  $("right").addEventListener("click", () => choose("right"));
  new ResizeObserver(() => { if (!$("task").hidden) layout(); }).observe($("task"));
  document.addEventListener("keydown", (event) => {
    if ($("task").hidden) return;
    const stacked = $("task").dataset.layout === "stacked";
    const first = event.key === "ArrowLeft" || (stacked && event.key === "ArrowUp");
    const second = event.key === "ArrowRight" || (stacked && event.key === "ArrowDown");
    if (first) { event.preventDefault(); choose("left"); }
    if (second) { event.preventDefault(); choose("right"); }
  });
}

init().catch((err) => say(err.message));
