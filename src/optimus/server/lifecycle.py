"""The life of one serving process: load the model in the background (health 503 meanwhile),
watch for hung steps, drain on shutdown.

Phases: loading -> ready -> draining, or -> dead (the engine's steps kept failing after
recovery, or a step exceeded the watchdog timeout) or failed (the model did not load). Dead
and failed are final: in-flight requests get an error and ``on_fatal`` runs, with which the
server process exits non-zero so that its supervisor restarts it."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable

from optimus.config import ServerConfig
from optimus.core.errors import EngineDeadError, EngineStartError
from optimus.server.errors import APIError, unavailable

log = logging.getLogger("optimus.server")

_REFUSALS = {  # phase -> (message, code, Retry-After seconds)
    "loading": ("the model is still loading", "model_loading", 5),
    "draining": ("the server is shutting down", "shutting_down", 5),
    "dead": ("the engine is not running", "engine_dead", 10),
    "failed": ("the model failed to load", "engine_failed", 60),
}


class Lifecycle:
    def __init__(self, engine, config: ServerConfig, on_fatal: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.config = config
        self.on_fatal = on_fatal  # called when the engine cannot serve (the runner exits non-zero)
        self._fatal_called = False
        if hasattr(engine, "on_dead"):
            engine.on_dead = self._engine_died
        self.draining = False
        self.load_error: str | None = None
        self.hung = False
        self._tasks: list[asyncio.Task] = []
        self._live: weakref.WeakSet = weakref.WeakSet()  # in-flight Generations

    @property
    def phase(self) -> str:
        if self.load_error is not None:
            return "failed"
        ready = bool(self.engine.ready)
        if self.hung or not self.engine.alive:
            return "dead"
        if self.draining:
            return "draining"
        return "ready" if ready else "loading"

    def admission_error(self) -> APIError | None:
        phase = self.phase
        if phase == "ready":
            return None
        message, code, retry_after = _REFUSALS[phase]
        return unavailable(message, code=code, retry_after=retry_after)

    def track(self, generation) -> None:
        self._live.add(generation)

    async def startup(self) -> None:
        self._tasks = [asyncio.create_task(self._load(), name="optimus-load"),
                       asyncio.create_task(self._watch(), name="optimus-watchdog")]

    async def drain(self, timeout: float | None = None) -> None:
        """Refuse new requests, let running ones finish for ``timeout`` s, abort the rest."""
        self.draining = True
        timeout = self.config.shutdown_timeout if timeout is None else timeout
        if not self.engine.ready:
            return
        log.info("draining: waiting up to %.1fs for running requests", timeout)
        self.engine.stop_admitting()
        await self.engine.drain(timeout)
        log.info("drained")

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        try:
            await self.engine.shutdown()
        except Exception:
            log.exception("engine shutdown failed")

    async def _load(self) -> None:
        try:
            await self.engine.start()
            log.info("engine ready")
        except EngineStartError as exc:  # whoever started the engine reported why
            self.load_error = str(exc)
            self._call_fatal()
        except Exception as exc:
            log.exception("model failed to load")
            self.load_error = str(exc) or type(exc).__name__
            self._call_fatal()

    async def _watch(self) -> None:
        timeout = self.config.watchdog_timeout
        period = max(0.01, min(1.0, timeout / 4))
        while not self.hung:
            await asyncio.sleep(period)
            if not self.engine.ready:
                continue
            try:
                started = self.engine.metrics().last_step_started
            except Exception:
                continue
            if started is not None and time.monotonic() - started > timeout:
                self._fire(time.monotonic() - started)

    def _fire(self, stalled: float) -> None:
        self.hung = True
        message = f"a step has run for {stalled:.1f}s, over the watchdog timeout of {self.config.watchdog_timeout}s"
        log.error("watchdog: %s; marking the engine dead", message)
        mark_dead = getattr(self.engine, "mark_dead", None)
        if mark_dead is not None:  # fails the engine's own streams too
            mark_dead(message)
        if getattr(self.engine, "alive", False) and mark_dead is not None:
            self.hung = False  # an engine process is being replaced: its client carries on
            return
        self._engine_died()

    def _engine_died(self) -> None:
        """Fail every in-flight call (a generic message; the cause is in the log), then exit."""
        for generation in list(self._live):
            generation.fail(EngineDeadError("the engine stopped"))
        log.error("the engine cannot continue; exiting with status 1 so a supervisor restarts the server")
        self._call_fatal()

    def _call_fatal(self) -> None:
        if self.on_fatal is not None and not self._fatal_called:
            self._fatal_called = True
            self.on_fatal()
