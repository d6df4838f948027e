"""A client of the server and the server's settings: the data the line, negotiation and dispatch share."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from aiortc import RTCPeerConnection

from . import protocol as P
from .tracks import POLICIES, BlockVideoTrack


@dataclass
class Settings:
    policy: str = "lossless"  # frame queue: lossless (the engine waits for the stream) | latest (drop oldest)
    queue_frames: int = 8  # frame queue capacity (0.5 s at 16 fps)
    input_queue_frames: int = 2  # ... when the model takes the client's camera: latency over smoothness
    ping_timeout: float = 8.0  # no message for this long: the client is gone (the SDK pings every 5 s)
    connect_timeout: float = 15.0  # offer answered but no connection + open data channel after this long
    offer_timeout: float = 5.0  # start_session but no SDP offer after this long: the place is lost
    max_pending_per_address: int = 4  # clients of one address not connected yet (a flood holds no more)
    max_session_seconds: float | None = None  # a session ends after this long; the next in line gets in
    block_timeout: float | None = None  # a block running longer ends the session (None: derived, see below)
    stuck_exit_seconds: float = 30.0  # a stuck engine thread that has not come back after this: give up
    advertise_address: str | None = None  # host candidates carry this address (NAT, containers)
    stop_timeout: float = 5.0  # the engine's watchdog, when a session is stopped
    max_message: int = 64 * 1024  # bytes per data-channel message
    rate: float = 30.0  # messages a second per client, on average ...
    burst: float = 60.0  # ... with bursts up to this many
    max_clients: int = 32  # in session + waiting + about to connect
    stats_interval: float = 1.0  # seconds between stats/queue messages
    ice_servers: list = field(default_factory=list)  # [{"uris": [...], "credentials"?: {...}}] for clients

    def __post_init__(self):
        if self.block_timeout is not None and self.block_timeout <= 0:
            raise ValueError(f"block_timeout must be > 0 seconds, got {self.block_timeout}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")


@dataclass(eq=False)
class Client:
    id: str
    remote: str = ""
    created: float = field(default_factory=time.monotonic)
    state: str = "new"  # new (no offer yet) | waiting | active | ended
    pc: RTCPeerConnection | None = None
    channel: Any = None
    track: BlockVideoTrack | None = None
    answer: str | None = None
    offered: float | None = None  # when the latest offer was answered
    connected: bool = False
    last_seen: float = field(default_factory=time.monotonic)
    bucket: P.TokenBucket | None = None
    limited: bool = False  # a rate-limit error was sent for the current flood
    tasks: list = field(default_factory=list)
    end_reason: str | None = None
    started: float | None = None  # when its session began
    # one line across replicas (reactor_graph/scale/relay.py): the session runs on another replica's engine,
    # this relay feeds its track and carries its messages (host side); or this client is such a relay, standing
    # for a client that another replica hosts (engine side)
    relay: Any = None
    relayed: bool = False
    # stats message
    last_sent: int = 0
    last_stats: float = field(default_factory=time.monotonic)

    @property
    def ready(self) -> bool:
        return self.channel is not None and self.channel.readyState == "open"

    def send(self, text: str) -> bool:
        ch = self.channel
        if ch is None or ch.readyState != "open":
            return False
        try:
            ch.send(text)
            return True
        except Exception:  # noqa: BLE001 - a channel closing under us must not break the caller
            return False
