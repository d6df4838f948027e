"""Wire shapes: envelopes, the flat schema ReactorController reads, the session response, flood control."""
import json
from enum import Enum
from typing import Literal, Optional

import pytest
from pydantic import BaseModel, Field

from reactor_graph.server import protocol as P


def test_parse_envelope():
    env = P.parse_envelope('{"scope":"application","data":{"type":"set_prompt","data":{"prompt":"x"}}}', 1000)
    assert env == P.Envelope("application", "set_prompt", {"prompt": "x"})
    assert P.parse_envelope('{"scope":"runtime","data":{"type":"ping"}}', 1000).data is None
    for raw, code in [("{", "bad_json"), ("[]", "bad_envelope"), (b"x", "bad_envelope"), ("x" * 2000, "too_large"),
                      ('{"scope":"runtime","data":{"type":""}}', "bad_envelope"),
                      ('"' + "é" * 600 + '"', "too_large")]:  # 1200 bytes of UTF-8 in 602 characters
        with pytest.raises(P.ProtocolError) as err:
            P.parse_envelope(raw, 1000)
        assert err.value.code == code


def test_messages_are_envelopes():
    assert json.loads(P.runtime("queue", {"position": 2})) == {"scope": "runtime",
                                                                "data": {"type": "queue", "data": {"position": 2}}}
    ok = json.loads(P.command_result("set_prompt", True))
    assert ok == {"scope": "application", "data": {"type": "commandResult",
                                                    "data": {"command": "set_prompt", "ok": True}}}
    bad = json.loads(P.command_result("set_prompt", False, "too short", "prompt", "at least 1 character"))
    assert bad["data"]["data"]["error"] == {"message": "too short", "field": "prompt", "reason": "at least 1 character"}


class Mode(str, Enum):
    fast = "fast"
    slow = "slow"


class Params(BaseModel):
    prompt: str = Field(min_length=1, max_length=20, description="what to show")
    strength: float = Field(0.5, ge=0, le=1)
    steps: int = Field(4, gt=0, lt=9)
    style: Literal["a", "b"] = "a"
    mode: Mode = Mode.fast
    seed: Optional[int] = None
    loop: bool = False


def test_flat_schema_from_pydantic():
    flat = P.flat_schema(Params.model_json_schema())
    assert flat["prompt"] == {"type": "string", "description": "what to show", "minLength": 1, "maxLength": 20,
                              "required": True}
    assert flat["strength"] == {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5, "required": False}
    assert flat["steps"]["minimum"] == 0 and flat["steps"]["maximum"] == 9 and flat["steps"]["type"] == "integer"
    assert flat["style"]["enum"] == ["a", "b"] and flat["style"]["type"] == "string"
    assert flat["mode"]["enum"] == ["fast", "slow"] and flat["mode"]["type"] == "string"  # via $defs
    assert flat["seed"]["type"] == "integer" and flat["seed"]["default"] is None  # Optional[int]
    assert flat["loop"] == {"type": "boolean", "default": False, "required": False}
    assert "type" not in flat and "properties" not in flat  # never the JSON Schema's own keys
    assert P.flat_schema({"type": "object", "properties": {}}) == {}
    assert P.flat_schema(None) == {}


def test_session_response_has_what_local_mode_needs_and_no_nulls():
    r = P.session_response("abc", "tiny", None, "0.1.0", P.sdk_commands([{"name": "reset", "description": None,
                                                                          "schema": {}}]), 16.0)
    assert r["selected_transport"]["protocol"] == "webrtc" and r["capabilities"]["tracks"][0]["name"] == "main_video"
    assert "version" not in r["model"]  # omitted, never null
    assert r["capabilities"]["commands"] == [{"name": "reset", "description": "", "schema": {}}]
    for key in ("session_id", "state", "cluster"):
        assert isinstance(r[key], str)


def test_parse_offer():
    sdp, mapping = P.parse_offer({"sdp_offer": "v=0\r\n", "track_mapping": [
        {"mid": "0", "name": "main_video", "kind": "video", "direction": "recvonly"}]})
    assert mapping == [P.TrackEntry("0", "main_video", "video", "recvonly")]
    for body in (None, [], {"sdp_offer": 1}, {"sdp_offer": "v=0", "track_mapping": {}},
                 {"sdp_offer": "v=0", "track_mapping": [{"mid": 0, "kind": "video", "direction": "recvonly"}]}):
        with pytest.raises(ValueError):
            P.parse_offer(body)


def test_token_bucket():
    now = [0.0]
    b = P.TokenBucket(rate=10, burst=5, clock=lambda: now[0])
    assert [b.take() for _ in range(7)] == [True] * 5 + [False] * 2
    now[0] += 0.25  # 2.5 tokens back
    assert [b.take() for _ in range(3)] == [True, True, False]
    now[0] += 100
    assert b.tokens <= 5 and sum(b.take() for _ in range(10)) == 5
