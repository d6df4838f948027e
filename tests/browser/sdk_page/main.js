// Test page: the unmodified Reactor JS SDK in local mode against a reactor-graph server on another origin.
// ?api=http://127.0.0.1:PORT. The test reads window.__sdk.
import { Reactor } from "@reactor-team/js-sdk";

const api = new URLSearchParams(location.search).get("api");
const out = { status: "disconnected", statuses: [], frames: 0, messages: [], runtime: [], errors: [],
              tracks: [], capabilities: null, connectError: null };
window.__sdk = out;
const video = document.getElementById("video");
const note = (line) => { document.getElementById("log").textContent += line + "\n"; };

const reactor = new Reactor({ modelName: "reactor-graph", local: true, apiUrl: api });
window.reactor = reactor;
reactor.on("statusChanged", (s) => { out.status = s; out.statuses.push(s); note("status " + s); });
reactor.on("message", (m) => out.messages.push(m));
reactor.on("runtimeMessage", (m) => out.runtime.push(m));
reactor.on("capabilitiesReceived", (c) => { out.capabilities = c; });
reactor.on("error", (e) => { out.errors.push({ code: e.code, message: e.message }); note("error " + e.code); });
reactor.on("trackReceived", (name, track, stream) => {
  out.tracks.push(name);
  if (name !== "main_video") return;
  video.srcObject = stream;
  video.play().catch(() => {});
  const tick = () => { out.frames++; video.requestVideoFrameCallback(tick); };
  video.requestVideoFrameCallback(tick);
});
reactor.connect().catch((e) => { out.connectError = String(e); note("connect failed " + e); });
