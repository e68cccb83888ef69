"""One engine replica: an ``AsyncEngine`` (its step loop in a thread, its own elastic controller)
inside a Ray Serve replica actor. ``launch`` wraps this plain class with ``serve.deployment``;
nothing here imports Ray, so it also runs (and is tested) in-process.

Invariants:
- the constructor returns only once the model is loaded, so Ray Serve routes nothing to a
  replica that cannot serve, and a restarted replica is routable only when ready;
- every request the replica accepted ends with a finished delta, a ``Refusal``, or an abort of
  its engine request (the consumer went away: the stream was cancelled or ``abort`` was called),
  so its KV pages are always freed;
- ``check_health`` fails (Ray Serve then replaces the replica) once the engine is dead or a
  step has run longer than the server's watchdog timeout."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import AsyncIterator

from optimus.config import EngineConfig
from optimus.core.params import SamplingParams
from optimus.core.scoring import ScoreRequest, ScoreResult
from optimus.engine.async_engine import AsyncEngine
from optimus.replicas.messages import Refusal, ReplicaInfo, ReplicaStatus, StreamDelta, delta_of, refusal_of

log = logging.getLogger("optimus.replica")


class EngineReplica:
    async def __init__(self, engine_config: EngineConfig, watchdog_timeout: float = 60.0) -> None:
        self.engine = AsyncEngine(engine_config)
        self._watchdog_timeout = watchdog_timeout
        await self.engine.start()
        log.info("replica ready (pid %d)", os.getpid())

    # ---- requests ----------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       group: str | None = None, events: bool = False) -> AsyncIterator[StreamDelta | Refusal]:
        """The request's outputs as deltas; a refusal (full queue, a request that does not fit
        the model, a dead engine, an internal failure) is the one and last item."""
        previous = None
        try:
            async for output in self.engine.generate(request_id, prompt_ids, params, group=group):
                yield delta_of(previous, output, events)
                previous = output
        except Exception as exc:  # cancellation (the ingress let go) is not caught: it aborts
            yield refusal_of(exc)

    async def score(self, request: ScoreRequest) -> ScoreResult | Refusal:
        try:
            return await self.engine.score(request)
        except Exception as exc:
            return refusal_of(exc)

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    # ---- state -------------------------------------------------------------------------
    async def info(self) -> ReplicaInfo:
        e = self.engine
        return ReplicaInfo(e.spec, e.tokenizer, e.max_model_len, e.model_name, e.block_size, os.getpid(),
                           socket.gethostname())

    async def status(self) -> ReplicaStatus:
        """Load (``queue_depth`` = running + waiting, KV usage) and the metrics snapshot."""
        metrics = self.engine.metrics()
        return ReplicaStatus(self.engine.ready and self.engine.alive, os.getpid(),
                             _without_step_start(metrics))

    async def stop_admitting(self) -> None:
        self.engine.stop_admitting()

    async def drain(self, timeout: float) -> None:
        self.engine.stop_admitting()
        await self.engine.drain(timeout)

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising makes it replace this replica."""
        if not self.engine.alive:
            raise RuntimeError("the engine's step loop stopped")
        started = self.engine.metrics().last_step_started
        if started is not None and time.monotonic() - started > self._watchdog_timeout:
            raise RuntimeError(f"a step has run for {time.monotonic() - started:.1f}s, over the watchdog "
                               f"timeout of {self._watchdog_timeout}s")

    async def __del__(self) -> None:  # Ray Serve calls an async __del__ on graceful shutdown
        await self.engine.shutdown()


def _without_step_start(metrics):
    """Monotonic clocks differ between machines: the replica watches its own steps
    (``check_health``), the ingress never sees a step start."""
    from dataclasses import replace

    return replace(metrics, last_step_started=None)
