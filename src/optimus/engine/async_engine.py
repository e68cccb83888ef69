"""AsyncEngine: the engine loop in its own thread, bridged to asyncio for the server.

The loop thread owns the :class:`Engine` exclusively; callers talk to it through a command
queue (add / abort) and receive outputs on per-request asyncio queues. Nothing is pickled.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable

from optimus.config import EngineConfig
from optimus.engine.engine import Engine
from optimus.engine.model_facts import ModelFactsView, model_facts
from optimus.engine.step_guard import StepGuard
from optimus.engine.stats import EngineMetrics
from optimus.core.outputs import RequestOutput
from optimus.core.params import SamplingParams
from optimus.core.errors import EngineDeadError, QueueFullError, RequestFailedError
from optimus.core.scoring import ScoreRequest, ScoreResult
from optimus.engine.scoring import ScoringQueue

log = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "EngineDeadError", "EngineMetrics", "QueueFullError", "RequestFailedError"]

# An engine whose steps keep failing after recovery cannot serve: give up after this many in a row.


class AsyncEngine(ModelFactsView):  # the model properties the server reads
    def __init__(self, config: EngineConfig, loaded=None,
                 factory: Callable[[EngineConfig], Engine] | None = None) -> None:
        self.config = config
        self._loaded = loaded
        self._factory = factory  # builds the Engine instead of Engine(config, loaded) (test harnesses)
        self.on_dead = None  # called (on the event loop) once the engine cannot continue
        self.ready = False
        self.alive = True
        self.engine: Engine | None = None
        self._info = None  # the model's facts, once the engine is built
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._admitting = True
        self._step_started: float | None = None
        self._scoring: ScoringQueue | None = None  # likelihood jobs the loop runs between steps

    # ---- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._factory is not None:
            self.engine = await asyncio.to_thread(self._factory, self.config)
        else:
            self.engine = await asyncio.to_thread(Engine, self.config, self._loaded)
        self._info = model_facts(self.engine)
        self._scoring = ScoringQueue(self.engine, self._loop, self.config.likelihood_samples,
                                     lambda: RequestFailedError("internal error while scoring this request"))
        self._thread = threading.Thread(target=self._run, name="optimus-engine", daemon=True)
        self._thread.start()
        self.ready = True

    def stop_admitting(self) -> None:
        self._admitting = False

    async def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (self._streams or self._scoring) and time.monotonic() < deadline and self.alive:
            await asyncio.sleep(0.05)
        for rid in list(self._streams):
            self.abort(rid)
        while self._streams and self.alive and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.02)

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
        if self.engine is not None and not (self._thread and self._thread.is_alive()):
            self.engine.close()  # tensor-parallel workers, if any

    def mark_dead(self, why: str) -> None:
        """No request can be served any more: fail every stream (clients see a generic
        message; ``why`` goes to the log) and tell ``on_dead`` (the server exits non-zero)."""
        first = self.alive
        if first:
            log.error("engine marked dead: %s", why)
        self.alive = False
        for q in self._streams.values():
            self._loop.call_soon_threadsafe(q.put_nowait, EngineDeadError("the engine stopped"))
        if self._scoring is not None:
            self._scoring.fail_all(EngineDeadError("the engine stopped"))
        if first and self.on_dead is not None:
            self._loop.call_soon_threadsafe(self.on_dead)

    # ---- requests ----------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       group: str | None = None, events: bool = False) -> AsyncIterator[RequestOutput]:
        """Outputs of one request. Refusals (dead engine, full queue, a request that does not
        fit the model) raise at once, before the loop thread sees the request. Commit events
        come with every output here, ``events`` or not."""
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        if not self._admitting:
            raise QueueFullError("the server is shutting down and admits no new requests")
        sc = self.config.scheduler
        if len(self._streams) >= sc.max_running + sc.max_waiting:
            raise QueueFullError(f"{len(self._streams)} requests are running or queued "
                                 f"(max-running {sc.max_running} + max-waiting {sc.max_waiting})")
        self.engine.check_request(prompt_token_ids, params)
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = q
        self._commands.put(("add", request_id, list(prompt_token_ids), params, group))
        self._wake.set()
        done = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                done = item.finished
                yield item
                if done:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not done:  # the consumer went away (client disconnect): free the request's pages
                self.abort(request_id)

    async def score(self, request: ScoreRequest) -> ScoreResult:
        """Log-probabilities of ``request``'s sequences (exact for causal models, an estimate
        for diffusion models: ``decoding/likelihood.py``), computed by the loop thread between
        steps. A sequence that cannot be scored raises ValueError (``sequence i: why``) at once."""
        if not self.alive or self._scoring is None:
            raise EngineDeadError("the engine is not running")
        if not self._admitting:
            raise QueueFullError("the server is shutting down and admits no new requests")
        if len(self._scoring) >= self.config.scheduler.max_waiting:
            raise QueueFullError(f"{len(self._scoring)} scoring requests are queued "
                                 f"(max-waiting {self.config.scheduler.max_waiting})")
        entry = self._scoring.submit(request)
        self._wake.set()
        try:
            return await entry.future
        finally:
            entry.cancelled = True  # the caller went away (or is done): the loop drops the job

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def metrics(self) -> EngineMetrics:
        if self.engine is None:
            return EngineMetrics()
        return EngineMetrics.of(self.engine.stats, self._step_started)

    # ---- the loop thread ---------------------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        if isinstance(item, RequestOutput) and item.finish_reason == "error":
            item = RequestFailedError("internal error while decoding this request")
        q = self._streams.get(request_id)
        if q is not None:
            self._loop.call_soon_threadsafe(q.put_nowait, item)

    def _handle_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, ids, params, group = cmd
                try:
                    self.engine.add_request(rid, ids, params, group=group)
                except (ValueError, QueueFullError) as exc:
                    self._deliver(rid, exc)
                except Exception as exc:  # one bad request must not stop the loop
                    log.exception("adding request %s failed", rid)
                    self._deliver(rid, RequestFailedError(f"could not add the request: {type(exc).__name__}"))
            else:
                try:
                    out = self.engine.abort(cmd[1])
                except Exception:  # as for adds: the loop goes on
                    log.exception("aborting request %s failed", cmd[1])
                    continue
                if out is not None:
                    self._deliver(cmd[1], out)

    def _run(self) -> None:
        guard = StepGuard(self.engine)
        while not self._stopping:
            scored = self._score_piece()  # scoring forwards alternate with steps
            self._handle_commands()
            if not self.engine.has_work():
                if not scored:
                    self._wake.wait(0.05)
                    self._wake.clear()
                continue
            self._step_started = time.monotonic()
            try:
                outputs = guard.step()
            finally:
                self._step_started = None
            if outputs is None:  # the engine cannot continue
                self._loop.call_soon_threadsafe(self.mark_dead, guard.why)
                return
            for out in outputs:
                self._deliver(out.request_id, out)

    def _score_piece(self) -> bool:
        """One forward of the oldest scoring job, if any (it fails alone if it raises)."""
        if not len(self._scoring):
            return False
        self._step_started = time.monotonic()  # the watchdog covers scoring forwards too
        try:
            return self._scoring.run_piece()
        finally:
            self._step_started = None

