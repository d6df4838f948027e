"""The wire format of the Reactor JS SDK's local mode (npm `@reactor-team/js-sdk` 2.9.0), server side.

HTTP bodies are snake_case JSON; the data channel `data` carries text frames shaped
`{"scope": "application" | "runtime", "data": {"type": str, "data": any}}`. Nothing here does I/O: the
session manager and the aiohttp app use these builders and parsers so the shapes live in one place.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

API_VERSION = "1"
WEBRTC_VERSION = "1.0"
MAIN_TRACK = "main_video"  # the name ReactorView shows by default

APPLICATION = "application"
RUNTIME = "runtime"

# runtime messages the client sends
PING = "ping"
REQUEST_CAPABILITIES = "requestCapabilities"
FILE_UPLOADED = "fileUploaded"
SWAP_NODE = "swapNode"  # {node, alternative?, spec?}: hot-swap a node (a declared alternative, or a spec)

# runtime messages this server sends
MODEL_CAPABILITIES = "modelCapabilities"  # {commands: [{name, description, schema}]}
QUEUE = "queue"  # {position, waiting}: 1-based place in the line for the model
SESSION_STARTED = "sessionStarted"  # {session_id, fps, width, height}
SESSION_ENDED = "sessionEnded"  # {reason, error}
STATS = "stats"  # once a second to the client in session
ERROR = "error"  # {code, message[, node]}: a message was refused, or a node failed
SWAP_RESULT = "swapResult"  # {node, ok, now?, stall_ms?, recaptured?, error?}

# application messages this server sends
COMMAND_RESULT = "commandResult"  # {command, ok[, error: {message, field, reason}]}

class ProtocolError(Exception):
    """A data-channel message that cannot be handled; `code` is stable, `message` is for people."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class Envelope:
    scope: str
    type: str
    data: Any
    uploads: Any = None  # {param: {upload_id, name, mime_type, size}}: FileRefs the SDK moved out of data


def parse_envelope(raw: Any, max_bytes: int) -> Envelope:
    """Parse one data-channel message; raises ProtocolError for anything that is not a proper envelope."""
    if not isinstance(raw, str):
        raise ProtocolError("bad_envelope", "messages are JSON text frames, not binary")
    if len(raw) > max_bytes or len(raw.encode("utf-8", "surrogatepass")) > max_bytes:
        raise ProtocolError("too_large", f"message larger than {max_bytes} bytes")
    try:
        msg = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("bad_json", f"not JSON: {str(exc)[:120]}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_envelope", 'expected {"scope": ..., "data": {"type": ..., "data": ...}}')
    scope, inner = msg.get("scope"), msg.get("data")
    if scope not in (APPLICATION, RUNTIME):
        raise ProtocolError("bad_envelope", f"scope must be 'application' or 'runtime', got {_short(scope)}")
    if not isinstance(inner, dict):
        raise ProtocolError("bad_envelope", "'data' must be an object {type, data}")
    kind = inner.get("type")
    if not isinstance(kind, str) or not kind:
        raise ProtocolError("bad_envelope", f"'data.type' must be a non-empty string, got {_short(kind)}")
    return Envelope(scope, kind, inner.get("data"), inner.get("uploads"))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def envelope(scope: str, kind: str, data: Any = None) -> str:
    return json.dumps({"scope": scope, "data": {"type": kind, "data": {} if data is None else data}},
                      separators=(",", ":"), default=str)


def raw_envelope(scope: str, data: Any) -> str:
    """`data` as the inner message, unchanged (a model's own {"type": ..., "data": ...})."""
    return json.dumps({"scope": scope, "data": data}, separators=(",", ":"))


def runtime(kind: str, data: Any = None) -> str:
    return envelope(RUNTIME, kind, data)


def application(kind: str, data: Any = None) -> str:
    return envelope(APPLICATION, kind, data)


def error_message(code: str, message: str, **extra: Any) -> str:
    return runtime(ERROR, {"code": code, "message": message, **extra})


def command_result(command: str, ok: bool, message: str | None = None, field: str | None = None,
                   reason: str | None = None, warning: str | None = None) -> str:
    data: dict[str, Any] = {"command": command, "ok": ok}
    if ok and warning:  # applied, but not all of it was understood (e.g. unknown prompt words)
        data["warning"] = warning
    if not ok:
        data["error"] = {"message": message or "failed", "field": field, "reason": reason or message}
    return application(COMMAND_RESULT, data)


# -- command schemas ------------------------------------------------------------------------------------

_JSON_TYPES = {"string", "integer", "number", "boolean"}


def flat_schema(schema: dict | None) -> dict[str, dict]:
    """A params JSON schema -> the flat `{param: {type, description?, minimum?, maximum?, enum?, required}}`
    map that the SDK's ReactorController reads (it would treat `type`/`properties` as parameter names).
    minLength/maxLength/default ride along for our own page; the SDK ignores them."""
    if not isinstance(schema, dict):
        return {}
    props = schema.get("properties")
    if not isinstance(props, dict):
        return {}
    required = set(schema.get("required") or [])
    defs = schema.get("$defs") or {}
    out: dict[str, dict] = {}
    for name, prop in props.items():
        prop = _resolve(prop, defs)
        desc: dict[str, Any] = {}
        choices = prop.get("enum")
        if choices is None and "const" in prop:
            choices = [prop["const"]]
        kind = prop.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), None)
        if kind not in _JSON_TYPES:
            kind = _infer_type(choices)
        desc["type"] = kind
        if prop.get("description"):
            desc["description"] = str(prop["description"])
        lo = prop.get("minimum", prop.get("exclusiveMinimum"))
        hi = prop.get("maximum", prop.get("exclusiveMaximum"))
        if isinstance(lo, (int, float)) and not isinstance(lo, bool):
            desc["minimum"] = lo
        if isinstance(hi, (int, float)) and not isinstance(hi, bool):
            desc["maximum"] = hi
        if prop.get("format") == "image":  # an image param: a FileRef or base64 (our page offers an upload)
            desc["format"] = "image"
        for key in ("minLength", "maxLength"):
            if isinstance(prop.get(key), int):
                desc[key] = prop[key]
        if isinstance(choices, list):
            desc["enum"] = list(choices)
        if "default" in prop:
            desc["default"] = prop["default"]
        desc["required"] = name in required
        out[name] = desc
    return out


def _resolve(prop: Any, defs: dict) -> dict:
    if not isinstance(prop, dict):
        return {}
    ref = prop.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        merged = dict(defs.get(ref.split("/")[-1], {}))
        merged.update({k: v for k, v in prop.items() if k != "$ref"})
        prop = merged
    for key in ("anyOf", "oneOf"):  # Optional[X] -> X
        options = prop.get(key)
        if isinstance(options, list):
            picked = next((o for o in options if isinstance(o, dict) and o.get("type") != "null"), None)
            if picked is not None:
                merged = dict(_resolve(picked, defs))
                merged.update({k: v for k, v in prop.items() if k != key})
                prop = merged
    return prop


def _infer_type(choices: Any) -> str:
    if isinstance(choices, list) and choices:
        if all(isinstance(c, bool) for c in choices):
            return "boolean"
        if all(isinstance(c, int) and not isinstance(c, bool) for c in choices):
            return "integer"
        if all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices):
            return "number"
    return "string"


def sdk_commands(schemas: list[dict]) -> list[dict]:
    """Host command schemas -> the SDK's `[{name, description, schema}]` (never null fields)."""
    out = []
    for cmd in schemas:
        out.append({"name": str(cmd.get("name")), "description": str(cmd.get("description") or ""),
                    "schema": flat_schema(cmd.get("schema"))})
    return out


# -- HTTP bodies ------------------------------------------------------------------------------------------

def session_response(session_id: str, model: str, model_version: str | None, server_version: str,
                     commands: list[dict], fps: float | None, inputs: list[str] = ()) -> dict:
    """`POST /start_session`'s answer: zod SessionResponseSchema, with the parts local mode needs in practice."""
    model_info: dict[str, Any] = {"name": model}
    if model_version:
        model_info["version"] = str(model_version)
    return {
        "session_id": session_id,
        "state": "ACTIVE",
        "cluster": "local",
        "model": model_info,
        "server_info": {"server_version": server_version},
        "selected_transport": {"protocol": "webrtc", "version": WEBRTC_VERSION},
        "capabilities": {
            "protocol_version": "1.0",
            "tracks": [{"name": MAIN_TRACK, "kind": "video", "direction": "recvonly"},
                       # video slots: the client publishes these (publishTrack / WebcamStream)
                       *({"name": n, "kind": "video", "direction": "sendonly"} for n in inputs)],
            "commands": commands,
            "emission_fps": fps,
        },
    }


@dataclass(frozen=True)
class TrackEntry:
    mid: str
    name: str
    kind: str
    direction: str


class OfferError(ValueError):
    """An SDP offer this server cannot answer; the message is for the client."""


def parse_offer(body: Any) -> tuple[str, list[TrackEntry]]:
    """The body of POST/PUT sdp_params -> (sdp offer, track mapping); ValueError says what is wrong."""
    if not isinstance(body, dict):
        raise OfferError("expected a JSON object with 'sdp_offer' and 'track_mapping'")
    sdp = body.get("sdp_offer")
    if not isinstance(sdp, str) or "v=0" not in sdp:
        raise OfferError("'sdp_offer' must be an SDP offer string")
    mapping = body.get("track_mapping", [])
    if not isinstance(mapping, list):
        raise OfferError("'track_mapping' must be a list of {mid, name, kind, direction}")
    entries = []
    for i, e in enumerate(mapping):
        if not isinstance(e, dict):
            raise OfferError(f"track_mapping[{i}] must be an object")
        mid, name, kind, direction = (e.get(k) for k in ("mid", "name", "kind", "direction"))
        if not isinstance(mid, str) or kind not in ("video", "audio") or direction not in ("recvonly", "sendonly"):
            raise OfferError(f"track_mapping[{i}] needs a string mid, kind video|audio and direction "
                             f"recvonly|sendonly")
        entries.append(TrackEntry(mid, str(name), kind, direction))
    return sdp, entries


# -- flood control ---------------------------------------------------------------------------------------

class TokenBucket:
    """`rate` messages a second on average, bursts up to `burst`."""

    def __init__(self, rate: float, burst: float, clock=time.monotonic):
        self.rate, self.burst, self.clock = float(rate), float(burst), clock
        self.tokens = float(burst)
        self.stamp = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
