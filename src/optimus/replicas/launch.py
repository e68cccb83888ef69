"""``optimus serve --replicas N``: the uvicorn ingress on this (driver) process, N engine
replicas as Ray Serve deployments.

The ingress is the usual FastAPI app (``server/app.py``) over a ``ReplicaSetClient``, served by
``server/runner.run_server`` as with one engine, so streaming, client-disconnect aborts, the
error envelope, backpressure (503 + Retry-After) and the SIGTERM drain are the same code. It
listens once Ray is up; the deployments (each replica loads the model) happen in the client's
``start()`` while health answers 503 ``loading``. Ray Serve's own HTTP proxy is not started.

Ray: ``ray.init()`` connects to the cluster ``RAY_ADDRESS`` names, else starts a local
instance that ends with this process. Replica ``i`` is the Ray Serve application
``optimus-replica-i`` holding one deployment ``engine`` with one replica; the replica actor's
process title is ``ray::ServeReplica:optimus-replica-i:engine``."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from dataclasses import dataclass

from optimus.config import EngineConfig, ServerConfig
from optimus.replicas.routing import ReplicaView

log = logging.getLogger("optimus.server")

APP_PREFIX = "optimus-replica-"
DEPLOYMENT = "engine"
RAY_MISSING = ("optimus serve: error: --replicas needs Ray Serve, which is not installed: "
               "pip install 'optimus-dllm[ray]' (from a checkout: pip install -e '.[ray]')")


@dataclass(frozen=True)
class ReplicaResources:
    """What Ray reserves for one replica: CPU replicas are small (half a core: Ray then gives
    torch one thread); a GPU replica takes one GPU per tensor-parallel rank."""

    num_cpus: float
    num_gpus: int

    @classmethod
    def of(cls, config: EngineConfig, cluster_gpus: float) -> "ReplicaResources":
        if config.model.device == "cpu" or cluster_gpus < 1:
            return cls(0.5, 0)
        return cls(1.0, config.parallel.tensor_parallel)


class RayDeployer:
    """Starts (or joins) Ray, deploys the replicas, tears them down; blocking Ray calls run
    in a thread so the ingress's event loop keeps answering."""

    def __init__(self, engine_config: EngineConfig, server_config: ServerConfig, log_level: str = "info") -> None:
        self.engine_config = engine_config
        self.server_config = server_config
        self.log_level = log_level
        self._apps: list[str] = []

    async def deploy(self) -> list[ReplicaView]:
        return await asyncio.to_thread(self._deploy)

    async def teardown(self) -> None:
        await asyncio.to_thread(self._teardown)

    def _deploy(self) -> list[ReplicaView]:
        import ray
        from ray import serve
        from ray.serve.config import ProxyLocation

        from optimus.replicas.replica import EngineReplica

        self.connect()
        serve.start(proxy_location=ProxyLocation.Disabled)
        sc = self.engine_config.scheduler
        capacity = sc.max_running + sc.max_waiting
        res = ReplicaResources.of(self.engine_config, ray.cluster_resources().get("GPU", 0))
        deployment = serve.deployment(
            EngineReplica, name=DEPLOYMENT, num_replicas=1,
            # streams + scoring calls + status polls + aborts: Ray Serve must never queue them
            max_ongoing_requests=2 * capacity + 64,
            ray_actor_options={"num_cpus": res.num_cpus, "num_gpus": res.num_gpus},
            health_check_period_s=2.0, health_check_timeout_s=30.0, graceful_shutdown_timeout_s=5.0,
            # one access line per status poll would bury the log: only at --log-level debug
            logging_config={"log_level": self.log_level.upper(), "enable_access_log": self.log_level == "debug"})
        count = self.server_config.replicas
        self._apps = [f"{APP_PREFIX}{i}" for i in range(count)]
        log.info("deploying %d engine replicas on Ray Serve (%s CPU, %d GPU each)", count, res.num_cpus, res.num_gpus)
        targets = [serve.RunTarget(deployment.bind(self.engine_config, self.server_config.watchdog_timeout),
                                   name=app, route_prefix=None) for app in self._apps]
        handles = serve.run_many(targets)
        return [ReplicaView(str(i), handle, capacity) for i, handle in enumerate(handles)]

    def _teardown(self) -> None:
        """On a cluster we joined, delete our applications (nothing of ours stays behind); a
        local instance ends with ``close``."""
        import ray
        from ray import serve

        if not ray.is_initialized() or not self.joined:
            return
        for app in self._apps:
            try:
                serve.delete(app)
            except Exception:
                log.exception("could not delete the Ray Serve application %s", app)

    @property
    def joined(self) -> bool:
        """A cluster is named: join it (else ``ray.init`` starts or finds a local instance)."""
        return bool(os.environ.get("RAY_ADDRESS"))

    def connect(self) -> None:
        """Start or join Ray, on the main thread: a driver whose Ray was started on another
        thread aborts in ``ray.shutdown()``."""
        import ray

        if not ray.is_initialized():
            ray.init(include_dashboard=None if self.joined else False, log_to_driver=True)

    def close(self) -> None:
        """Disconnect from Ray, on the main thread (Ray's core worker must not be shut down
        from another one); a local instance this process started stops with it."""
        import ray

        if ray.is_initialized():
            ray.shutdown()


def serve_replicas(engine_config: EngineConfig, server_config: ServerConfig, log_level: str = "info") -> int:
    """Run the ingress until a signal; the exit status (2 when Ray Serve is not installed)."""
    try:
        import ray.serve  # noqa: F401  (only checks that it is there; Ray starts in the client)
    except ImportError:
        print(RAY_MISSING, file=sys.stderr, flush=True)
        return 2
    from optimus.replicas.client import ReplicaSetClient
    from optimus.server.runner import run_server

    deployer = RayDeployer(engine_config, server_config, log_level)
    deployer.connect()
    try:
        return run_server(ReplicaSetClient(engine_config, deployer), server_config, log_level=log_level)
    finally:
        deployer.close()
