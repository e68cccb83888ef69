// Optimus web page: chat over POST /ui/generate (server-sent events read from a fetch body),
// the canvas view driven by its commit events, and gauges polled from GET /ui/gauges.
// window.optimusUI exposes the page state (read by the browser test).
"use strict";

const $ = (id) => document.getElementById(id);
// committed: answer tokens committed so far. Positions past --max-tokens (the block's tail)
// and, once the answer is known, the end-of-text padding after it are decoding work, not
// answer: they are counted apart (afterAnswer).
const ui = (window.optimusUI = {
  requests: 0, committed: 0, afterAnswer: 0, steps: 0, done: false, error: null, text: "",
});

// ---- canvas --------------------------------------------------------------------------------
// One request's canvas: cells[i] is canvas offset i; engine step ids map to a local index
// (0, 1, 2...) that picks the colour.
class CanvasView {
  constructor(root, stepsList) {
    this.root = root;
    this.stepsList = stepsList;
  }

  reset(layout) {
    this.layout = layout;
    this.stepIndex = new Map();
    this.cells = [];
    this.root.textContent = "";
    this.stepsList.textContent = "";
    this.grow(layout.canvas);
  }

  grow(n) {
    const { block_size: bs, block_phase: phase, max_tokens: maxTokens } = this.layout;
    for (let i = this.cells.length; i < n; i++) {
      const cell = document.createElement("span");
      cell.className = "cell masked";
      if (i > 0 && (i + phase) % bs === 0) cell.classList.add("block-start");
      if (i >= maxTokens) cell.classList.add("tail");
      cell.title = `position ${i}: masked`;
      cell.textContent = " ";
      this.root.appendChild(cell);
      this.cells.push(cell);
    }
  }

  colour(step) {
    if (!this.stepIndex.has(step)) this.stepIndex.set(step, this.stepIndex.size);
    const k = this.stepIndex.get(step);
    return `hsl(${(k * 47) % 360} 70% 78%)`;
  }

  commit(ev) {
    const [lo, hi] = ev.chunk;
    this.grow(Math.max(hi, ...ev.positions.map((p) => p + 1)));
    for (const c of this.cells) c.classList.remove("in-chunk", "fresh");
    for (let i = Math.max(0, lo); i < Math.min(hi, this.cells.length); i++) this.cells[i].classList.add("in-chunk");
    const colour = this.colour(ev.step);
    ev.positions.forEach((p, j) => {
      const cell = this.cells[p];
      cell.className = cell.className.replace("masked", "committed");
      cell.classList.add("fresh");
      cell.style.backgroundColor = colour;
      cell.textContent = clip(visible(ev.tokens[j]), 9);
      cell.title = `position ${p}: ${JSON.stringify(ev.tokens[j])} (step ${ev.step}, chunk [${lo}, ${hi}))`;
    });
    this.logStep(ev, colour, lo, hi);
  }

  logStep(ev, colour, lo, hi) {
    const li = document.createElement("li");
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.backgroundColor = colour;
    const label = document.createElement("span");
    label.textContent = `step ${ev.step} · chunk [${lo}, ${hi}) · +${ev.positions.length}`;
    const toks = document.createElement("code");
    toks.textContent = ev.tokens.map(visible).join(" ");
    li.append(sw, label, toks);
    this.stepsList.appendChild(li);
    this.stepsList.scrollTop = this.stepsList.scrollHeight;
  }

  maskedCount() {
    return this.cells.filter((c) => c.classList.contains("masked")).length;
  }

  // Committed positions before offset ``end`` (the answer's) and from it on (padding, tail).
  committedSplit(end) {
    let inside = 0;
    let after = 0;
    this.cells.forEach((c, i) => {
      if (c.classList.contains("committed")) i < end ? (inside += 1) : (after += 1);
    });
    return { inside, after };
  }

  // The request is over: cells past the answer are marked as such, and positions it never
  // decoded (after an early end of text) stop showing as masked.
  finish(answerLen) {
    this.cells.forEach((cell, i) => {
      if (i >= answerLen) cell.classList.add("after-answer");
      if (cell.classList.contains("masked")) {
        cell.classList.replace("masked", "unused");
        cell.title = `position ${i}: not decoded (the answer ended before it)`;
      }
    });
  }
}

function clip(text, n) {
  return text.length > n ? `${text.slice(0, n - 1)}…` : text;
}

function visible(token) {
  return token.replace(/\n/g, "⏎").replace(/\t/g, "⇥").replace(/ /g, "·") || "∅";
}

// ---- server-sent events over fetch ------------------------------------------------------------
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of frame.split("\n")) {
        if (line.startsWith("data:")) yield JSON.parse(line.slice(5));
      }
    }
  }
}

// A refused call's readable reason: the message of the API's error envelope, else the body.
async function errorMessage(response) {
  const body = await response.text();
  try {
    const parsed = JSON.parse(body);
    const message = (parsed.error && parsed.error.message) || parsed.detail;
    if (message) return typeof message === "string" ? message : JSON.stringify(message);
  } catch (_) {
    // not JSON: the body as it came
  }
  return body || response.statusText;
}

// 401: the server wants an API key. Open the key field and say so, in words.
function askForKey() {
  const hadKey = Boolean($("api-key").value.trim());
  $("api-key-box").open = true;
  $("api-key").focus();
  return hadKey
    ? "The server did not accept this API key. Check the key in the API key field and send again."
    : "This server needs an API key. Enter it in the API key field (opened below the prompt) and send again.";
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// ---- chat ------------------------------------------------------------------------------------
function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function setMeta(bubble, text) {
  let meta = bubble.querySelector(".meta");
  if (!meta) {
    meta = document.createElement("span");
    meta.className = "meta";
    bubble.appendChild(meta);
  }
  meta.textContent = text;
}

function setAnswer(bubble, text) {
  bubble.firstChild ? (bubble.firstChild.textContent = text) : bubble.append(text);
}

const view = new CanvasView($("canvas"), $("steps"));

async function ask(prompt) {
  ui.requests += 1;
  Object.assign(ui, { committed: 0, afterAnswer: 0, steps: 0, done: false, error: null, text: "", answerLen: 0 });
  addMessage("user", prompt);
  const bubble = addMessage("assistant", "…");
  const body = {
    prompt,
    max_tokens: Number($("max-tokens").value) || 64,
    policy: $("policy").value || null,
    chat: $("chat").checked,
  };
  const response = await fetch("/ui/generate", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (response.status === 401) {
    bubble.remove();
    throw new Error(askForKey());
  }
  if (!response.ok) {
    bubble.remove();
    throw new Error(`The server refused the request (HTTP ${response.status}): ${await errorMessage(response)}`);
  }
  for await (const ev of sseEvents(response)) handle(ev, bubble);
}

function handle(ev, bubble) {
  if (ev.type === "start") {
    view.reset(ev);
    $("canvas-status").textContent = `prompt ${ev.prompt_tokens} tokens · canvas ${ev.canvas} · block ${ev.block_size}`;
  } else if (ev.type === "commit") {
    view.commit(ev);
    ui.steps += 1;
    countCommitted(view.layout.max_tokens);
  } else if (ev.type === "text") {
    ui.text = ev.text;
    ui.answerLen = ev.n;
    setAnswer(bubble, ev.text || "…");
  } else if (ev.type === "done") {
    // The answer's own length: the last text event can miss tokens that decode to no text.
    if (Number.isInteger(ev.answer_tokens)) ui.answerLen = ev.answer_tokens;
    ui.text = ev.text;
    setAnswer(bubble, ev.text || "(empty answer)");
    view.finish(ui.answerLen);
    countCommitted(ui.answerLen);
    const chunks = Object.entries(ev.chunk_sizes).map(([c, n]) => `${c}×${n}`).join(" ");
    const perStep = ev.steps ? (ui.committed / ev.steps).toFixed(2) : "0";
    setMeta(bubble, `${ev.finish_reason} · ${ui.committed} tokens in ${ev.steps} steps ` +
      `(${perStep} per step) · chunks ${chunks} · ${ev.elapsed_s.toFixed(2)} s`);
    ui.done = true;
  } else if (ev.type === "error") {
    throw new Error(ev.message);
  }
}

// Counts committed positions before ``end`` as the answer's; the rest apart.
function countCommitted(end) {
  const { inside, after } = view.committedSplit(end);
  Object.assign(ui, { committed: inside, afterAnswer: after });
  const past = after ? ` · ${after} past the answer` : "";
  $("canvas-status").textContent =
    `${inside} committed · ${view.maskedCount()} masked · ${ui.steps} steps${past}`;
}

$("ask").addEventListener("submit", async (e) => {
  e.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt) return;
  $("send").disabled = true;
  try {
    await ask(prompt);
    $("prompt").value = "";
  } catch (err) {
    ui.error = String(err.message || err);
    addMessage("error", ui.error);
  } finally {
    $("send").disabled = false;
  }
});

$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("ask").requestSubmit();
  }
});

// ---- gauges ------------------------------------------------------------------------------------
// Snapshots are cumulative; rates come from the difference of two successive polls.
const gauges = { last: null, tps: [], lastTps: null };

function diffChunks(now, before) {
  const out = {};
  for (const [c, n] of Object.entries(now)) {
    const d = n - ((before && before[c]) || 0);
    if (d > 0) out[c] = d;
  }
  return out;
}

function drawChunks(counts, scope) {
  const root = $("g-chunks");
  root.textContent = "";
  $("g-chunk-scope").textContent = `(${scope})`;
  const total = Object.values(counts).reduce((a, b) => a + b, 0);
  for (const [c, n] of Object.entries(counts).sort((a, b) => Number(a[0]) - Number(b[0]))) {
    const row = document.createElement("div");
    row.className = "row";
    const label = document.createElement("span");
    label.textContent = `C=${c}`;
    const track = document.createElement("div");
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = `${(100 * n) / Math.max(total, 1)}%`;
    track.appendChild(fill);
    const count = document.createElement("span");
    count.className = "n";
    count.textContent = String(n);
    row.append(label, track, count);
    root.appendChild(row);
  }
  if (!total) root.textContent = "no steps yet";
}

function drawSpark(values) {
  const cv = $("g-spark");
  const ctx = cv.getContext("2d");
  ctx.clearRect(0, 0, cv.width, cv.height);
  if (!values.length) return;
  const top = Math.max(1, ...values);
  ctx.strokeStyle = "#2f6fde";
  ctx.lineWidth = 2;
  ctx.beginPath();
  values.forEach((v, i) => {
    const x = (i / Math.max(values.length - 1, 1)) * (cv.width - 4) + 2;
    const y = cv.height - 4 - (v / top) * (cv.height - 14);
    i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
  });
  ctx.stroke();
  ctx.fillStyle = "#6b7385";
  ctx.font = "10px sans-serif";
  ctx.fillText(`max ${top.toFixed(1)}`, 4, 10);
}

function showGauges(g) {
  const prev = gauges.last;
  $("g-running").textContent = g.running;
  $("g-waiting").textContent = g.waiting;
  $("g-kv").textContent = `${(100 * g.kv_usage).toFixed(1)}%`;
  $("g-kv-bar").style.width = `${Math.min(100, 100 * g.kv_usage)}%`;
  $("g-step-ms").textContent = `${g.last_step_ms.toFixed(1)} ms`;
  const dSteps = prev ? g.steps - prev.steps : 0;
  if (dSteps > 0) {
    gauges.lastTps = (g.tokens_committed - prev.tokens_committed) / dSteps;
    gauges.tps.push(gauges.lastTps);
    if (gauges.tps.length > 60) gauges.tps.shift();
  }
  $("g-tps").textContent = gauges.lastTps === null ? "–" : gauges.lastTps.toFixed(2);
  const recent = prev && dSteps > 0 ? diffChunks(g.chunk_size_counts, prev.chunk_size_counts) : null;
  drawChunks(recent || g.chunk_size_counts, recent ? "recent" : "since start");
  drawSpark(gauges.tps);
  gauges.last = g;
}

async function pollGauges() {
  try {
    const response = await fetch("/ui/gauges", { headers: headers() });
    if (!response.ok) throw new Error(`HTTP ${response.status}: ${await errorMessage(response)}`);
    const g = await response.json();
    if (g.ready) {
      showGauges(g);
      $("g-state").textContent = `updated ${new Date().toLocaleTimeString()}`;
    } else {
      $("g-state").textContent = "engine loading…";
    }
  } catch (err) {
    $("g-state").textContent = `gauges unavailable: ${err}`;
  }
  setTimeout(pollGauges, 600);
}

pollGauges();
