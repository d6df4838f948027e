// The built-in page. It speaks the same local-mode protocol as the Reactor JS SDK, with plain browser
// WebRTC: POST /start_session, the sdp_params offer/answer routes, and the "data" channel.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { status: "idle", sessionId: null, frames: 0, replies: [], messages: [], queue: null,
                stats: null, fps: 0, commands: [] };
window.__rg = state; // read by tests
let pc = null, channel = null, pingTimer = null;

function log(text) {
  const li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  const list = $("log");
  list.prepend(li);
  while (list.children.length > 200) list.lastChild.remove();
}

function setStatus(s, cls) {
  state.status = s;
  const el = $("status");
  el.textContent = s;
  el.className = "status " + (cls || "");
  $("connect").disabled = !["idle", "ended", "failed"].includes(s);
  $("disconnect").disabled = !$("connect").disabled;
}

// -- forms from the commands' schemas (the flat {param: {type, enum, minimum, ...}} map) -------------------
function field(name, p) {
  const label = document.createElement("label");
  const caption = document.createElement("span");
  caption.textContent = name + (p.required ? " *" : "") + (p.description ? ` — ${p.description}` : "");
  label.append(caption);
  let input;
  if (p.format === "image") { // an uploaded picture (as the SDK's uploadFile makes it)
    input = document.createElement("input");
    input.type = "file";
    input.accept = "image/png,image/jpeg,image/webp,image/gif,image/bmp";
  } else if (Array.isArray(p.enum)) {
    input = document.createElement("select");
    for (const v of p.enum) {
      const o = document.createElement("option");
      o.value = JSON.stringify(v);
      o.textContent = String(v);
      input.append(o);
    }
    if (p.default !== undefined) input.value = JSON.stringify(p.default);
  } else if (p.type === "boolean") {
    input = document.createElement("input");
    input.type = "checkbox";
    input.checked = !!p.default;
  } else if (p.type === "integer" || p.type === "number") {
    input = document.createElement("input");
    input.type = "number";
    input.step = p.type === "integer" ? "1" : "any";
    if (typeof p.minimum === "number") input.min = p.minimum;
    if (typeof p.maximum === "number") input.max = p.maximum;
    if (p.default !== undefined) input.value = p.default;
  } else {
    const long = (p.maxLength || 0) > 200;
    input = document.createElement(long ? "textarea" : "input");
    if (!long) input.type = "text";
    if (long) input.rows = 2;
    if (typeof p.minLength === "number") input.minLength = p.minLength;
    if (typeof p.maxLength === "number") input.maxLength = p.maxLength;
    if (p.default !== undefined) input.value = p.default;
  }
  input.name = name;
  input.required = !!p.required && p.type !== "boolean";
  label.append(input);
  return label;
}

function readForm(form, schema) {
  const params = {};
  for (const [name, p] of Object.entries(schema)) {
    const el = form.elements[name];
    if (!el) continue;
    if (p.format === "image") continue; // uploaded on submit (uploadImages)
    if (Array.isArray(p.enum)) params[name] = JSON.parse(el.value);
    else if (p.type === "boolean") params[name] = el.checked;
    else if (p.type === "integer" || p.type === "number") {
      if (el.value === "") { if (p.required) params[name] = null; continue; }
      params[name] = p.type === "integer" ? parseInt(el.value, 10) : parseFloat(el.value);
    } else {
      if (el.value === "" && !p.required) continue;
      params[name] = el.value;
    }
  }
  return params;
}

function buildForms(commands) {
  state.commands = commands;
  const box = $("forms");
  box.replaceChildren();
  if (!commands.length) { box.textContent = "this model takes no commands"; return; }
  for (const cmd of commands) {
    const schema = cmd.schema || {};
    const form = document.createElement("form");
    form.className = "command";
    form.dataset.command = cmd.name;
    const h = document.createElement("h3");
    h.textContent = cmd.name;
    form.append(h);
    if (cmd.description) {
      const d = document.createElement("p");
      d.className = "desc";
      d.textContent = cmd.description;
      form.append(d);
    }
    for (const [name, p] of Object.entries(schema)) form.append(field(name, p));
    const button = document.createElement("button");
    button.type = "submit";
    button.textContent = "Send";
    const reply = document.createElement("div");
    reply.className = "reply";
    form.append(button, reply);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const params = readForm(form, schema);
      let uploads;
      try { uploads = await uploadImages(form, schema); } catch (err) {
        reply.className = "reply err";
        reply.textContent = String(err.message || err);
        return;
      }
      form.dataset.sent = JSON.stringify(params);
      if (send("application", cmd.name, params, uploads)) {
        reply.className = "reply";
        reply.textContent = "sent…";
      } else {
        reply.className = "reply err";
        reply.textContent = "not connected";
      }
    });
    box.append(form);
  }
}

function showReply(data) {
  state.replies.push(data);
  const form = document.querySelector(`form.command[data-command="${CSS.escape(String(data.command))}"]`);
  const text = data.ok ? "applied" : "error: " + (data.error && data.error.field ? `${data.error.field}: ` : "") +
    (data.error ? (data.error.reason || data.error.message) : "failed");
  const warning = data.ok && data.warning ? ` — ${data.warning}` : "";
  log(`${data.command}: ${text}${warning}`);
  if (!form) return;
  const el = form.querySelector(".reply");
  el.className = "reply " + (data.ok ? (warning ? "warn" : "ok") : "err");
  el.textContent = text + warning;
  const sent = form.dataset.sent ? JSON.parse(form.dataset.sent) : {};
  if (data.ok && typeof sent.prompt === "string") { // what the video shows now (the model's own reading: the warning)
    state.prompt = sent.prompt;
    const now = $("prompt-now");
    now.hidden = false;
    now.textContent = `now showing: "${sent.prompt}"${warning}`;
  }
}

// -- stats ---------------------------------------------------------------------------------------------
function showStats(s) {
  state.stats = s;
  const ms = (v) => (typeof v === "number" ? `${v.toFixed(1)} ms` : "–");
  $("stat-target").textContent = s.target_fps ?? "–";
  $("stat-block").textContent = ms(s.block_ms);
  $("stat-depth").textContent = s.queue_depth !== undefined ? `${s.queue_depth} / ${s.queue_capacity}` : "–";
  $("stat-wait").textContent = ms(s.queue_ms);
  $("stat-sent").textContent = s.sent ?? "–";
  $("stat-loss").textContent = s.repeats !== undefined ? `${s.repeats} / ${s.drops}` : "–";
  $("stat-policy").textContent = s.policy ?? "–";
  const sv = s.serving;
  $("stat-serving").textContent = sv ? `${sv.serving}${sv.serving !== "compiled" && sv.progress ? ` (${sv.progress})` : ""}` : "–";
  const inputs = Object.entries(s.inputs || {});
  $("stat-inputs").textContent = inputs.length ? inputs.map(([n, i]) =>
    `${n}: ${i.state}${i.latency_ms_p50 != null ? ` (${i.latency_ms_p50} ms)` : ""}`).join(", ") : "–";
}

function countFrames() {
  const video = $("video");
  let last = performance.now(), lastFrames = 0, lastQuality = 0;
  if ("requestVideoFrameCallback" in HTMLVideoElement.prototype) {
    const tick = () => { state.frames++; video.requestVideoFrameCallback(tick); };
    video.requestVideoFrameCallback(tick);
  }
  setInterval(() => {
    const now = performance.now();
    if (!("requestVideoFrameCallback" in HTMLVideoElement.prototype) && video.getVideoPlaybackQuality) {
      const q = video.getVideoPlaybackQuality().totalVideoFrames;
      state.frames += q - lastQuality;
      lastQuality = q;
    }
    state.fps = (state.frames - lastFrames) * 1000 / (now - last);
    last = now; lastFrames = state.frames;
    $("stat-fps").textContent = state.fps.toFixed(1);
  }, 1000);
}

// -- the data channel ----------------------------------------------------------------------------------
function send(scope, type, data, uploads) {
  if (!channel || channel.readyState !== "open") return false;
  const inner = { type, data: data ?? {} };
  if (uploads && Object.keys(uploads).length) inner.uploads = uploads; // FileRefs, as the SDK sends them
  channel.send(JSON.stringify({ scope, data: inner }));
  return true;
}

// -- the input side: uploads (the SDK's uploadFile sequence) and the camera ---------------------------------
async function uploadFile(file) {
  const slot = await api("POST", `/sessions/${state.sessionId}/uploads`,
                         { name: file.name, size: file.size, mime_type: file.type || "application/octet-stream" });
  if (!slot.ok) throw new Error(`upload refused: ${await slot.text()}`);
  const { presigned_id, presigned_url } = await slot.json();
  const put = await fetch(presigned_url, { method: "PUT", body: file });
  if (!put.ok) throw new Error(`upload refused: ${await put.text()}`);
  const ref = { upload_id: presigned_id, name: file.name, mime_type: file.type, size: file.size };
  send("runtime", "fileUploaded", ref);
  return ref;
}

async function uploadImages(form, schema) {
  const uploads = {};
  for (const [name, p] of Object.entries(schema)) {
    if (p.format !== "image") continue;
    const file = form.elements[name] && form.elements[name].files[0];
    if (!file) { if (p.required) throw new Error(`choose an image for ${name}`); continue; }
    uploads[name] = await uploadFile(file);
  }
  return uploads;
}

const cameras = {}; // track name -> {transceiver, stream}
function buildInputs(tracks) {
  const box = $("inputs");
  box.replaceChildren();
  for (const t of tracks) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = `Use my camera (${t.name})`;
    b.dataset.track = t.name;
    b.onclick = async () => {
      const cam = cameras[t.name];
      if (!cam) return;
      if (cam.stream) { // stop
        await cam.transceiver.sender.replaceTrack(null);
        cam.stream.getTracks().forEach((x) => x.stop());
        cam.stream = null;
        b.textContent = `Use my camera (${t.name})`;
        log(`camera ${t.name} stopped`);
        return;
      }
      try {
        cam.stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 }, height: { ideal: 480 } } });
        await cam.transceiver.sender.replaceTrack(cam.stream.getVideoTracks()[0]);
        b.textContent = `Stop camera (${t.name})`;
        log(`camera ${t.name} published`);
      } catch (err) { log(`camera: ${err.message || err}`); cam.stream = null; }
    };
    box.append(b);
  }
  $("inputs-title").hidden = tracks.length === 0;
}

function onMessage(ev) {
  let msg;
  try { msg = JSON.parse(ev.data); } catch { log(`non-JSON message: ${String(ev.data).slice(0, 100)}`); return; }
  const inner = msg && msg.data ? msg.data : {};
  state.messages.push(msg);
  if (state.messages.length > 500) state.messages.shift();
  const d = inner.data || {};
  if (msg.scope === "application" && inner.type === "commandResult") return showReply(d);
  if (msg.scope !== "runtime") { log(`message: ${JSON.stringify(inner).slice(0, 200)}`); return; }
  switch (inner.type) {
    case "stats": showStats(d); break;
    case "queue":
      state.queue = d.position;
      setStatus("waiting", "waiting");
      $("queue").hidden = false;
      $("queue").textContent = `Waiting for the model: position ${d.position} of ${d.waiting} in line`;
      break;
    case "sessionStarted":
      state.queue = null;
      $("queue").hidden = true;
      setStatus("in session", "ready");
      log("session started");
      break;
    case "sessionEnded":
      setStatus("ended", "ended");
      log(`session ended: ${d.reason}${d.error ? " — " + d.error : ""}`);
      teardown(false);
      break;
    case "error": log(`error ${d.code}: ${d.message}`); break;
    case "modelCapabilities": buildForms(d.commands || []); buildSwaps(d.alternatives || []); break;
    case "swapResult":
      state.replies.push({ swap: d });
      log(d.ok ? `swapped ${d.node} -> ${d.now} (stall ${Number(d.stall_ms).toFixed(1)} ms` +
                 `${d.recaptured ? ", recaptured" : ""})` : `swap of ${d.node} refused: ${d.error}`);
      break;
    default: log(`runtime ${inner.type}`);
  }
}

// -- connecting (the SDK's local-mode sequence) --------------------------------------------------------------
// The page may be served under /auth/<token>/ (a server started with a token): every route lives beside it.
const BASE = location.pathname.replace(/\/+$/, "");

async function api(method, path, body) {
  const res = await fetch(BASE + path, {
    method, headers: body ? { "Content-Type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  return res;
}

function gathered(conn, timeoutMs) {
  if (conn.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (conn.iceGatheringState === "complete") { conn.removeEventListener("icegatheringstatechange", done); resolve(); } };
    conn.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs);
  });
}

async function connect() {
  setStatus("connecting");
  try {
    const started = await api("POST", "/start_session", {});
    if (!started.ok) throw new Error(`start_session: ${started.status} ${await started.text()}`);
    const session = await started.json();
    state.sessionId = session.session_id;
    $("model").textContent = session.model.name;
    buildForms(session.capabilities.commands || []);
    const base = `/sessions/${session.session_id}/transport/webrtc`;
    const ice = await (await api("GET", `${base}/ice_servers`)).json();
    pc = new RTCPeerConnection({ iceServers: (ice.ice_servers || []).map((s) => ({ urls: s.uris,
      username: s.credentials && s.credentials.username, credential: s.credentials && s.credentials.password })) });
    channel = pc.createDataChannel("data");
    channel.onmessage = onMessage;
    channel.onopen = () => {
      log("data channel open");
      pingTimer = setInterval(() => send("runtime", "ping", {}), 5000);
      send("runtime", "requestCapabilities", {}); // the reply also lists the alternatives to swap in
    };
    channel.onclose = () => { clearInterval(pingTimer); };
    const transceiver = pc.addTransceiver("video", { direction: "recvonly" });
    const inputs = (session.capabilities.tracks || []).filter((t) => t.direction === "sendonly" && t.kind === "video");
    for (const t of inputs) cameras[t.name] = { transceiver: pc.addTransceiver("video", { direction: "sendonly" }), stream: null };
    buildInputs(inputs);
    pc.ontrack = (ev) => {
      const video = $("video");
      video.srcObject = ev.streams[0] || new MediaStream([ev.track]);
      video.play().catch(() => {});
    };
    pc.onconnectionstatechange = () => {
      log(`connection ${pc.connectionState}`);
      if (["failed", "closed"].includes(pc.connectionState) && state.status !== "ended") {
        setStatus("failed", "ended");
        teardown(true);
      }
    };
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc, 5000);
    const offer = { sdp_offer: pc.localDescription.sdp, client_info: { sdk_version: "page", sdk_type: "js" },
      track_mapping: [{ mid: transceiver.mid, name: "main_video", kind: "video", direction: "recvonly" },
        ...inputs.map((t) => ({ mid: cameras[t.name].transceiver.mid, name: t.name, kind: "video", direction: "sendonly" }))] };
    const posted = await api("POST", `${base}/sdp_params`, offer);
    if (posted.status !== 202) throw new Error(`sdp_params: ${posted.status} ${await posted.text()}`);
    let answer = null;
    for (let i = 0, wait = 100; i < 20 && !answer; i++, wait = Math.min(wait * 2, 2000)) {
      const res = await api("GET", `${base}/sdp_params`);
      if (res.status === 200) answer = (await res.json()).sdp_answer;
      else if (res.status === 202) await new Promise((r) => setTimeout(r, wait));
      else throw new Error(`sdp_params: ${res.status} ${await res.text()}`);
    }
    if (!answer) throw new Error("no SDP answer");
    await pc.setRemoteDescription({ type: "answer", sdp: answer });
    setStatus("waiting", "waiting");
  } catch (err) {
    log(`connect failed: ${err.message || err}`);
    setStatus("failed", "ended");
    teardown(true);
  }
}

function teardown(tellServer) {
  if (tellServer && state.sessionId) {
    const id = state.sessionId;
    fetch(BASE + "/stop_session", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ session_id: id }), keepalive: true }).catch(() => {});
  }
  clearInterval(pingTimer);
  for (const cam of Object.values(cameras)) if (cam.stream) cam.stream.getTracks().forEach((x) => x.stop());
  for (const k of Object.keys(cameras)) delete cameras[k];
  if (channel) { try { channel.close(); } catch {} }
  if (pc) { try { pc.close(); } catch {} }
  channel = null; pc = null; state.sessionId = null;
}

$("connect").addEventListener("click", connect);
$("disconnect").addEventListener("click", () => { teardown(true); setStatus("ended", "ended"); log("disconnected"); });
window.addEventListener("pagehide", () => {
  if (state.sessionId) navigator.sendBeacon("/stop_session", JSON.stringify({ session_id: state.sessionId }));
});
countFrames();
connect();

// -- hot-swapping nodes: each declared alternative, on each node it can stand in for, and back ------------
function buildSwaps(alternatives) {
  const box = $("swaps");
  box.textContent = "";
  const targets = new Set();
  for (const alt of alternatives) {
    for (const node of alt.targets) {
      targets.add(node);
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = `${node} → ${alt.name}`;
      b.onclick = () => sendRuntime("swapNode", { node, alternative: alt.name });
      box.append(b);
    }
  }
  for (const node of targets) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = `${node} → original`;
    b.onclick = () => sendRuntime("swapNode", { node, alternative: node });
    box.append(b);
  }
  $("swaps-title").hidden = box.children.length === 0;
}

function sendRuntime(type, data) { send("runtime", type, data); }
