"""Two places where aiortc trusts the network more than a local server may, mended around its edges.

- Host candidates: aioice gathers on every non-loopback interface whatever address HTTP is bound to, and
  leaves loopback out, so a server bound to 127.0.0.1 offers addresses the user did not open and, on a
  machine with loopback alone, none that work. `restrict_candidates(bind)` makes gathering follow the bind
  address (loopback when bound to loopback, that one interface when bound to one address, all of them
  for a wildcard). aiortc has no per-connection setting for this; one server runs per process, so the
  choice is process-wide.
- A text frame that is not UTF-8 makes aiortc's SCTP receive path raise, which tears the whole transport
  down. `guard_text_frames()` turns it into a message the session manager can answer with an error.
"""
from __future__ import annotations

import ipaddress
import logging
import re

log = logging.getLogger("reactor_graph.server")

_WILDCARDS = ("", "0.0.0.0", "::")
_state: dict = {"bind": None, "original": None}


class InvalidText:
    """What a data channel delivers for a text frame whose bytes are not UTF-8."""

    def __init__(self, data: bytes):
        self.size = len(data)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return address == "localhost"


def candidate_addresses(bind: str, available: list[str], ipv6: bool) -> list[str]:
    """The interface addresses to gather host candidates on, for a server bound to `bind`."""
    if bind in _WILDCARDS:
        return available
    if _is_loopback(bind):
        return ["::1"] if ipv6 else ["127.0.0.1"]
    return [a for a in available if a == bind.strip("[]")] or available


def restrict_candidates(bind: str) -> None:
    import aioice.ice

    if _state["original"] is None:
        _state["original"] = aioice.ice.get_host_addresses

        def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
            original = _state["original"]
            if _state["bind"] is None:
                return original(use_ipv4, use_ipv6)
            out = []
            if use_ipv4:
                out += candidate_addresses(_state["bind"], original(True, False), ipv6=False)
            if use_ipv6 and not (_is_loopback(_state["bind"]) and use_ipv4):
                out += candidate_addresses(_state["bind"], original(False, True), ipv6=True)
            return out

        aioice.ice.get_host_addresses = get_host_addresses
    _state["bind"] = "127.0.0.1" if bind == "localhost" else bind


_CANDIDATE = re.compile(r"^(a=candidate:\S+ \d+ \S+ \d+ )(\S+)( \d+ typ host.*)$", re.MULTILINE)


def advertise(sdp: str, address: str | None) -> str:
    """The answer with its host candidates' address replaced by `address` (behind NAT or in a container)."""
    if not address:
        return sdp
    sdp = _CANDIDATE.sub(lambda m: m.group(1) + address + m.group(3), sdp)
    family = "IP6" if ":" in address else "IP4"
    return re.sub(r"^c=IN IP[46] \S+", f"c=IN {family} {address}", sdp, flags=re.MULTILINE)


def guard_text_frames() -> None:
    from aiortc import rtcsctptransport as sctp

    cls = sctp.RTCSctpTransport
    if getattr(cls, "_rg_guarded", False):
        return
    original = cls._data_channel_receive

    async def _data_channel_receive(self, stream_id: int, pp_id: int, data: bytes) -> None:
        if pp_id == sctp.WEBRTC_STRING and stream_id in self._data_channels:
            try:
                data.decode("utf8")
            except UnicodeDecodeError:
                self._data_channels[stream_id].emit("message", InvalidText(data))
                return
        await original(self, stream_id, pp_id, data)

    cls._data_channel_receive = _data_channel_receive
    cls._rg_guarded = True
