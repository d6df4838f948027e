"""WebRTC negotiation: the client's offer answered with the model's video on the transceiver it receives on.

The SDK maps its transceivers by mid in `track_mapping`: the model's video goes on the first recvonly video
entry (`main_video`); a client without a mapping gets it on its first receiving video transceiver.
"""
from __future__ import annotations

import asyncio
import logging
import time

from aiortc import RTCPeerConnection, RTCSessionDescription

from . import protocol as P

log = logging.getLogger("reactor_graph.server")


async def answer(pc: RTCPeerConnection, sdp: str, mapping: list[P.TrackEntry], track) -> str:
    """Apply the offer, attach `track`, and return the answer's SDP. Raises OfferError, in the client's terms."""
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        by_mid = {t.mid: t for t in pc.getTransceivers()}
        attached = False
        for entry in mapping:
            t = by_mid.get(entry.mid)
            if t is None:
                raise P.OfferError(f"track_mapping names mid {entry.mid[:40]!r}, which the offer does not have")
            if entry.direction == "recvonly" and entry.kind == "video" and not attached:
                _send_on(t, track)
                attached = True
        if not attached and not mapping:  # a client without a mapping: the first video it receives
            for t in pc.getTransceivers():
                if t.kind == "video" and getattr(t, "_offerDirection", "recvonly") in ("recvonly", "sendrecv"):
                    _send_on(t, track)
                    attached = True
                    break
        if not attached:
            raise P.OfferError("the offer has no video transceiver for the client to receive "
                               f"'{P.MAIN_TRACK}' on (a recvonly video entry in track_mapping)")
        await pc.setLocalDescription(await pc.createAnswer())
    except P.OfferError:
        raise
    except Exception as exc:  # aiortc's own errors name its internals: log them, tell the client plainly
        log.info("could not answer an offer: %s: %s", type(exc).__name__, exc)
        raise P.OfferError("could not answer the SDP offer: expected an offer from a WebRTC client with a "
                           "video transceiver and a data channel named 'data'") from None
    return pc.localDescription.sdp


def _send_on(transceiver, track) -> None:
    transceiver.sender.replaceTrack(track)
    transceiver.direction = "sendonly"


async def discard(track) -> None:
    """Read a track the client publishes and drop its frames (no slot takes them)."""
    try:
        while True:
            await track.recv()
    except Exception:  # noqa: BLE001 - MediaStreamError when it ends, CancelledError at close
        return


async def flush(channel, timeout: float) -> None:
    """Give queued data-channel messages (e.g. sessionEnded) a moment to leave before closing."""
    if channel is None or channel.readyState != "open":
        return
    end = time.monotonic() + timeout
    await asyncio.sleep(0.02)
    while getattr(channel, "bufferedAmount", 0) > 0 and time.monotonic() < end:
        await asyncio.sleep(0.02)


async def close_pc(pc: RTCPeerConnection) -> None:
    try:
        await asyncio.wait_for(pc.close(), 5.0)
    except Exception:  # noqa: BLE001 - closing is best effort; never hang shutdown on it
        log.debug("closing a peer connection failed", exc_info=True)
