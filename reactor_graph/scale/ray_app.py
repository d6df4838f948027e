"""`reactor-graph run GRAPH --replicas N [--ray-address ADDR]`: N engine replicas on Ray Serve, one front.

Each replica is a Ray Serve deployment of one replica (`replica-0` ... `replica-{N-1}`, so that the front
can address each: sessions are sticky), which loads the model once and serves today's server on a port of
its own (replica.py); Ray Serve restarts one that dies or fails its health check (`check_health`: the
engine is stuck for good). The front (front.py) runs in this process on `--port` and reaches the replicas
through their deployment handles (status, metrics) and their ports (the SDP exchange, relayed). Serve's own
HTTP proxy is not started: the front is the only address.

Needs `ray[serve]`: `pip install 'reactor-graph[scale]'`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
from typing import Any, Callable

from ray import serve

from .front import Front
from .replica import ReplicaServer

log = logging.getLogger("reactor_graph.scale")

APP = "reactor-graph"


class EngineReplica:
    """One engine and its server, inside a Ray Serve replica."""

    def __init__(self, index: int, graph: str, token: str, bind: str, engine: dict, settings: dict,
                 threads: int = 1):
        import torch

        from ..cli import _open

        torch.set_num_threads(max(1, threads))
        model = _open(graph, engine.get("device"), engine.get("dtype"), engine.get("compile"),
                      engine.get("random_weights", False), weights_dir=engine.get("weights_dir"))
        self.replica = ReplicaServer(model, token, bind=bind, index=index, **settings).start()

    async def status(self) -> dict:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.replica._status(),
                                                                          self.replica.loop))

    async def metrics(self) -> str:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.replica._metrics_text(),
                                                                          self.replica.loop))

    def check_health(self) -> None:
        ok, why = self.replica.healthy()
        if not ok:
            raise RuntimeError(why)

    def crash(self, reason: str = "replica crashed") -> None:
        """A fault (tests, operators): end the sessions here with `reason`, then die; Ray restarts it."""
        try:
            self.replica.end_all(reason)
        finally:
            os._exit(1)

    def __del__(self):  # Ray Serve stops this replica (scale down, shutdown, failed health check)
        replica = getattr(self, "replica", None)
        if replica is not None:
            try:
                replica.end_all("replica stopping")
                replica.stop(10)
            except Exception:  # noqa: BLE001
                pass


class Replicas:
    """The application's ingress: holds the replica deployments (the front uses their handles by name)."""

    def __init__(self, *replicas):
        self.replicas = replicas

    def count(self) -> int:
        return len(self.replicas)


class RayPool:
    """The front's view of the replicas through their deployment handles."""

    def __init__(self, n: int, token: str, app: str = APP):
        self.token = token
        self.handles = [serve.get_deployment_handle(f"replica-{i}", app_name=app) for i in range(n)]

    def __len__(self) -> int:
        return len(self.handles)

    async def status(self, i: int) -> dict:
        return await self.handles[i].status.remote()

    async def metrics(self, i: int) -> str:
        return await self.handles[i].metrics.remote()


def deploy(graph: str, replicas: int, token: str, bind: str = "127.0.0.1", engine: dict | None = None,
           settings: dict | None = None, cpus: float = 1.0, gpus: float = 0.0, threads: int = 1,
           app: str = APP) -> RayPool:
    """Start (or replace) the Serve application; returns when every replica has loaded its model."""
    serve.start(proxy_location="Disabled")
    replica = serve.deployment(EngineReplica, num_replicas=1, max_ongoing_requests=64,
                               health_check_period_s=2, health_check_timeout_s=15,
                               graceful_shutdown_timeout_s=15,
                               ray_actor_options={"num_cpus": cpus, "num_gpus": gpus})
    ingress = serve.deployment(Replicas, num_replicas=1, ray_actor_options={"num_cpus": 0})
    bound = [replica.options(name=f"replica-{i}").bind(i, graph, token, bind, engine or {}, settings or {},
                                                       threads) for i in range(replicas)]
    serve.run(ingress.bind(*bound), name=app, route_prefix=None)
    return RayPool(replicas, token, app)


def init_ray(address: str | None, replicas: int, cpus: float, gpus: float) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=max(1, int(replicas * cpus + 0.999)), num_gpus=int(replicas * gpus),
                 include_dashboard=False, log_to_driver=False)


def serve_replicas(graph: str, replicas: int, ray_address: str | None, host: str, port: int, access: Any,
                   engine: dict, settings: dict, max_seconds: float | None = None,
                   announce: Callable[[str], None] | None = None) -> int:
    """Run the Serve application and the front until Ctrl-C / SIGTERM (or `max_seconds`)."""
    import torch

    gpus = 1.0 if torch.cuda.is_available() and (engine.get("device") or "auto") != "cpu" else 0.0
    init_ray(ray_address, replicas, 1.0, gpus)
    token = secrets.token_urlsafe(24)
    bind = host if ray_address is None else _node_address(host)
    pool = deploy(graph, replicas, token, bind=bind, engine=engine, settings=settings, gpus=gpus)
    return asyncio.run(_front(pool, access, host, port, max_seconds, announce))


def _node_address(host: str) -> str:
    """Replicas on other machines bind their own address, which clients must reach (docs/scale-out.md)."""
    from ..server.access import is_loopback_host

    if is_loopback_host(host):
        return host
    import ray.util

    return ray.util.get_node_ip_address()


async def _front(pool: RayPool, access: Any, host: str, port: int, max_seconds: float | None,
                 announce: Callable[[str], None] | None) -> int:
    front = Front(pool, access)
    await front.start(host, port)
    await front.wait_ready(1)
    first = next(b.status for b in front.backends if b.status)
    front.model = str((await _commands(front)).get("model", "")) or ""
    (announce or (lambda u: print(f"serving at {u}", flush=True)))(front.page_url)
    log.info("%d replicas; first at %s", len(pool), first.get("url"))
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, done.set)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    try:
        await asyncio.wait_for(done.wait(), max_seconds)
    except asyncio.TimeoutError:
        pass
    finally:
        await front.close()
        serve.delete(APP)
    return 0


async def _commands(front: Front) -> dict:
    b = next(x for x in front.backends if x.healthy and x.url)
    async with front.http.get(b.url + "/api/commands") as r:
        return await r.json() if r.status == 200 else {}
