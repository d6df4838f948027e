"""Many sessions on many replicas behind one address (issue 19).

replica.py: one engine's in-process server (server/), run on its own port, as a replica sees it.
front.py:   the address clients use: today's routes, relaying the SDP exchange to the session's replica.
ray_app.py: the replicas as Ray Serve deployments (`reactor-graph run --replicas N`); needs `ray[serve]`
            (`pip install 'reactor-graph[scale]'`).
"""
