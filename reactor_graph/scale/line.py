"""The one line across replicas: who gets which free engine, and everyone else's place.

The front is the single decider. Its clients wait in the replicas that host their peer connections, in
arrival order at the front (`start_session`), all of them one line. Each round (every status poll, and when
a session ends through the front) `plan` gives each free engine to the first client in line that is ready
(connected, data channel open, heard from lately; one that is still connecting keeps its place and the next
goes first, as at a single server): its own replica's engine when that one is free (no relay), else through
a relay (relay.py) a free engine that no ready client of its own replica is waiting for (else the lowest). A graph that takes the client's camera is not
relayed, so its clients take only their own replica's engine. Everyone left is told its place in the whole
line: 1 + the clients ahead of it, wherever they are hosted (for a graph that is not relayed: ahead of it at
its own replica, the only ones it waits behind).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class View:
    """What the front knows of one replica this round."""

    index: int
    free: bool  # ready and its engine free
    in_session: bool = False
    relays: bool = True
    waiting: list[str] = field(default_factory=list)  # session ids waiting here
    ready: set[str] = field(default_factory=set)  # ... of them, those ready to start


def plan(views: list[View], order: dict[str, int]) -> tuple[list[tuple[str, int, int]], dict[int, dict]]:
    """-> ([(session id, host, engine)], {host: {session id: queue message data}}) for one round."""
    line = sorted((order.get(sid, 1 << 62), sid, v.index) for v in views for sid in v.waiting)
    by = {v.index: v for v in views}
    free = [v.index for v in sorted(views, key=lambda v: v.index) if v.free]
    assigned: list[tuple[str, int, int]] = []
    done: set[str] = set()
    for _, sid, host in line:
        done.add(sid)
        if not free:
            break
        if sid not in by[host].ready:
            continue
        if host in free:
            engine = host
        elif by[host].relays:  # an engine nobody at its own replica is ready for first: fewer relays
            engine = min((e for e in free if by[e].relays),
                         key=lambda e: (any(s in by[e].ready for s in by[e].waiting if s not in done), e),
                         default=None)
            if engine is None:
                continue
        else:
            continue
        free.remove(engine)
        assigned.append((sid, host, engine))
    taken = {a[0] for a in assigned}
    rest = [(sid, host) for _, sid, host in line if sid not in taken]
    in_session = bool(assigned) or any(v.in_session for v in views)
    positions: dict[int, dict] = {v.index: {} for v in views}
    # a client waits behind those who compete for the same engines: all relayed ones, or its host's alone
    groups: dict = {}
    for sid, host in rest:
        groups.setdefault("all" if by[host].relays else host, []).append((sid, host))
    for group in groups.values():
        for i, (sid, host) in enumerate(group):
            positions[host][sid] = {"position": i + 1, "waiting": len(group), "in_session": in_session}
    return assigned, positions
