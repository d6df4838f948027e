"""The server behind `reactor-graph run`: aiohttp + aiortc, speaking the Reactor JS SDK's local-mode protocol.

app.py (routes, CORS, `serve`), sessions.py (clients, the line, sessions), tracks.py (BlockVideoTrack: blocks
in, paced frames out), protocol.py (wire shapes), metrics.py (Prometheus text), static/ (the built-in page).
It depends only on reactor_graph.host.StreamHost.
"""
