"""The engine process: the step loop runs here, alone with its GIL, and never waits on HTTP work.

The main thread is a busy loop: take what the front-ends sent (adds, aborts, forwarded calls;
non-blocking reads of one ZeroMQ socket), run a step, hand that step's outputs, grouped by
front-end, to the outbox. The outbox thread owns the sockets towards the front-ends: it encodes
and sends ONE message per front-end per step (every stream's new tokens and finish states, see
``wire``), and every ``METRICS_PERIOD_S`` a metrics snapshot that also carries the start time of
a step in progress, from which the front-ends' watchdog sees a hung step.

Text is not produced here: answers are detokenized by the front-ends (stop strings are still
checked here, where a stop must end the request). Exit status: 0 after SIGTERM, 1 when the loop
cannot continue (steps kept failing after recovery) or loading failed, 2 when the model cannot be
loaded because of what the user gave (a missing path, a bad option): the supervisor prints that
line and exits 2 itself."""

from __future__ import annotations

import logging
import os
import queue
import signal
from collections import deque
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from optimus.config import EngineConfig
from optimus.core.errors import QueueFullError, RequestFailedError
from optimus.core.outputs import RequestOutput
from optimus.engine import wire
from optimus.engine.model_facts import model_facts
from optimus.engine.step_guard import StepGuard
from optimus.engine.stats import EngineMetrics

log = logging.getLogger("optimus.engine")

METRICS_PERIOD_S = 0.1
IDLE_POLL_MS = 100  # an idle loop wakes this often to notice SIGTERM
METRICS_NOW = ("metrics",)  # outbox item: send a snapshot at once


def engine_path(ipc_dir: str, epoch: int) -> str:
    return f"ipc://{ipc_dir}/engine-{epoch}"


def frontend_path(ipc_dir: str, index: int) -> str:
    return f"ipc://{ipc_dir}/frontend-{index}"


@dataclass(frozen=True)
class EngineProcSpec:
    config: EngineConfig
    ipc_dir: str
    epoch: int  # 0 for the first engine process of a server, +1 per restart
    frontends: int
    factory: Callable[[EngineConfig], object] | None = None  # builds the Engine (tests slow it down)
    log_level: str = "info"


def engine_process_main(spec: EngineProcSpec, conn) -> None:
    """Target of the spawned engine process; ``conn`` tells the supervisor ``("ready",)`` or
    ``("error", message)``."""
    os.setpgrp()  # a terminal's Ctrl-C reaches the supervisor only; it stops us in order
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=spec.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        engine = _build(spec)
    except (FileNotFoundError, ValueError) as exc:  # what the user gave: one clear line, exit 2
        conn.send(("error", str(exc) or type(exc).__name__))
        sys.exit(2)
    except Exception as exc:
        log.exception("model failed to load")
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        sys.exit(1)
    core = EngineCore(engine, spec, stop)
    conn.send(("ready",))
    sys.exit(core.run())


def _build(spec: EngineProcSpec):
    if spec.factory is not None:
        return spec.factory(spec.config)
    from optimus.engine.engine import Engine
    return Engine(spec.config)


def engine_info(engine) -> wire.EngineInfo:
    facts = model_facts(engine)
    return wire.EngineInfo(facts.spec, facts.tokenizer, facts.max_model_len, facts.model_name, facts.block_size,
                           engine.allocator.num_pages, engine.allocator.page_size, os.getpid())


class EngineCore:
    def __init__(self, engine, spec: EngineProcSpec, stop: threading.Event) -> None:
        self.engine = engine
        engine.post.stream_text = False  # the front-ends detokenize
        engine.post.final_text = False
        self.spec = spec
        self._stop = stop
        self._ctx = zmq.Context()
        self._inbox = self._ctx.socket(zmq.PULL)
        self._inbox.bind(engine_path(spec.ipc_dir, spec.epoch))
        self.step_started: float | None = None
        self._owner: dict[str, tuple[int, int]] = {}  # engine request id -> (front-end, handle)
        self._sent: dict[str, int] = {}  # tokens already sent per request
        self._events: set[str] = set()  # requests whose commit events the front-end wants
        self.calls = EngineCalls(engine, self)
        self._jobs: deque = deque()  # (front-end, call id, job) of forwarded calls run in pieces
        self.outbox = Outbox(self._ctx, spec, self.metrics)
        self.outbox.start()
        self.outbox.broadcast([wire.READY, spec.epoch, wire.dumps(engine_info(engine))])

    def metrics(self) -> EngineMetrics:
        return EngineMetrics.of(self.engine.stats, self.step_started)

    def run(self) -> int:
        guard = StepGuard(self.engine)  # a failed step ends its requests; 3 in a row end the process
        code = 0
        idle = False  # a metrics snapshot went out since the engine last had work
        try:
            while not self._stop.is_set():
                pieces = self._run_job_piece()  # job pieces alternate with steps
                busy = pieces or self._jobs or self.engine.has_work()
                if not busy and not idle:  # what a scrape right after the last answer must see
                    self.outbox.send_metrics_now()
                idle = not busy
                if self._read_inbox(wait=not busy) and not self.engine.has_work():
                    self.outbox.send_metrics_now()  # aborts while idle freed pages
                if not self.engine.has_work():
                    continue
                self.step_started = time.monotonic()
                try:
                    outputs = guard.step()
                finally:
                    self.step_started = None
                if outputs is None:
                    log.error("%s; the process exits", guard.why)
                    code = 1
                    break
                self.publish(outputs)
        finally:
            self.outbox.close()
            self._inbox.close(linger=0)
        return code

    # ---- inputs ------------------------------------------------------------------------
    def _read_inbox(self, wait: bool) -> int:
        """Handle every message waiting (first up to IDLE_POLL_MS for one if ``wait``); how many."""
        if wait and not self._inbox.poll(IDLE_POLL_MS):
            return 0
        handled = 0
        while True:
            try:
                frame = self._inbox.recv(zmq.NOBLOCK)
                handled += 1
            except zmq.Again:
                return handled
            try:
                self._handle(wire.unpack(frame))
            except Exception:  # a malformed message must not stop the loop
                log.exception("bad message from a front-end")

    def _handle(self, msg: list) -> None:
        kind, frontend = msg[0], msg[1]
        if kind == wire.ADD:
            self._add(frontend, *msg[2:])
        elif kind == wire.ABORT:
            outputs = [out for handle in msg[2] if (out := self.engine.abort(f"{frontend}.{handle}")) is not None]
            self.publish(outputs)
        elif kind == wire.CALL:
            self._call(frontend, msg[2], msg[3], msg[4])

    def _add(self, frontend: int, handle: int, prompt_ids: list, params: dict, group, events: bool) -> None:
        rid = f"{frontend}.{handle}"
        try:
            self.engine.add_request(rid, prompt_ids, wire.params_from_wire(params), group=group)
        except Exception as exc:
            kind = "queue_full" if isinstance(exc, QueueFullError) else (
                "invalid" if isinstance(exc, ValueError) else "failed")
            if kind == "failed":
                log.exception("adding request %s failed", rid)
            self.outbox.send(frontend, [wire.STEP, self.spec.epoch,
                                        [[handle, 0, [], "error", {wire.REFUSED: [kind, str(exc)]}]]])
            return
        self._owner[rid] = (frontend, handle)
        self._sent[rid] = 0
        if events:
            self._events.add(rid)

    def _call(self, frontend: int, call_id: int, method: str, payload: bytes) -> None:
        """A forwarded engine-client method, run between steps: ``EngineCalls.<method>`` if there
        is one, else ``Engine.<method>``. A result with ``advance()`` is a job (scoring): the
        loop runs one piece of it per turn and replies with its ``result()`` when it is done."""
        try:
            args, kwargs = wire.loads(payload)
            target = getattr(self.calls, method, None) or getattr(self.engine, method)
            result = target(*args, **kwargs)
        except Exception as exc:
            if not isinstance(exc, (ValueError, QueueFullError)):
                log.exception("forwarded call %s failed", method)
            self._reply(frontend, call_id, False, exc)
            return
        if hasattr(result, "advance"):
            self._jobs.append((frontend, call_id, result))
        else:
            self._reply(frontend, call_id, True, result)

    def _reply(self, frontend: int, call_id: int, ok: bool, value) -> None:
        value = value if ok else _portable(value)
        self.outbox.send(frontend, [wire.REPLY, self.spec.epoch, call_id, ok, wire.dumps(value)])

    def _run_job_piece(self) -> bool:
        """One piece of the oldest job; False when there is none. A failing job ends alone."""
        if not self._jobs:
            return False
        frontend, call_id, job = self._jobs[0]
        self.step_started = time.monotonic()  # the watchdog covers these forwards too
        try:
            job.advance()
            if job.done:
                self._jobs.popleft()
                self._reply(frontend, call_id, True, job.result())
        except Exception as exc:
            log.exception("forwarded job failed: %s: %s; ending it", type(exc).__name__, exc)
            self._jobs.popleft()
            self._reply(frontend, call_id, False, RequestFailedError("internal error while scoring this request"))
        finally:
            self.step_started = None
        return True

    # ---- outputs -----------------------------------------------------------------------
    def publish(self, outputs: list[RequestOutput]) -> None:
        """One STEP message per front-end with news: per stream the tokens since the last
        message (``base`` = how many it already has), the finish reason, and extras."""
        batches: dict[int, list] = {}
        for out in outputs:
            rid = out.request_id
            owner = self._owner.get(rid)
            if owner is None:
                continue
            base = self._sent[rid]
            ids = out.token_ids
            if len(ids) < base:  # never expected (answers only grow); resend in full
                base = 0
            extra = None
            if rid in self._events and out.events:
                extra = {wire.EVENTS: wire.events_to_wire(out.events)}
            if out.finished:
                extra = {**(extra or {}), wire.STATS: wire.stats_to_wire(out.stats)}
                del self._owner[rid], self._sent[rid]
                self._events.discard(rid)
            else:
                self._sent[rid] = len(ids)
            batches.setdefault(owner[0], []).append([owner[1], base, list(ids[base:]), out.finish_reason, extra])
        for frontend, items in batches.items():
            self.outbox.send(frontend, [wire.STEP, self.spec.epoch, items])


class EngineCalls:
    """Forwarded methods that are not ``Engine``'s own: they return a job run in pieces."""

    def __init__(self, engine, core: EngineCore) -> None:
        self._engine, self._core = engine, core

    def score(self, request):
        """Log-probabilities of ``request`` (``AsyncEngine.score``): checked at once, then one
        forward of at most ``--max-tokens-per-step`` tokens per turn of the loop."""
        from optimus.engine.scoring import ScoringJob, check_score_request

        e, sc = self._engine, self._engine.config.scheduler
        if len(self._core._jobs) >= sc.max_waiting:
            raise QueueFullError(f"{len(self._core._jobs)} scoring requests are queued (max-waiting {sc.max_waiting})")
        check_score_request(request, e.spec, e.max_model_len, sc.max_tokens_per_step, e.block_size)
        return ScoringJob(request, e.loaded.model, e.spec, samples=e.config.likelihood_samples, seed=e.config.seed,
                          budget=sc.max_tokens_per_step, block=e.block_size, device=e.device)


def _portable(exc: BaseException) -> BaseException:
    """An exception the front-end can unpickle: its own class if that pickles, else RuntimeError."""
    try:
        wire.loads(wire.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class Outbox(threading.Thread):
    """Owns the PUSH sockets to the front-ends (ZeroMQ sockets stay in one thread): encodes and
    sends what the loop queues, and a metrics snapshot every ``METRICS_PERIOD_S``. It also ends
    the process when the supervisor is gone (the engine must not outlive the server)."""

    def __init__(self, ctx: zmq.Context, spec: EngineProcSpec, metrics: Callable[[], EngineMetrics]) -> None:
        super().__init__(name="optimus-outbox", daemon=True)
        self._ctx, self._spec, self._metrics = ctx, spec, metrics
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._parent = os.getppid()

    def send(self, frontend: int, message: list) -> None:
        self._queue.put((frontend, message))

    def broadcast(self, message: list) -> None:
        self._queue.put((None, message))

    def send_metrics_now(self) -> None:
        """A snapshot to every front-end after what is queued (the engine just went idle)."""
        self._queue.put(METRICS_NOW)

    def close(self) -> None:
        self._queue.put(None)
        self.join(5.0)

    def run(self) -> None:
        sockets = []
        for i in range(self._spec.frontends):
            s = self._ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.SNDHWM, 0)  # never drop, never block the engine
            s.setsockopt(zmq.LINGER, 1000)
            s.connect(frontend_path(self._spec.ipc_dir, i))
            sockets.append(s)
        next_metrics = 0.0
        try:
            while True:
                try:
                    item = self._queue.get(timeout=METRICS_PERIOD_S)
                except queue.Empty:
                    item = ()
                if item is None:
                    return
                if item is METRICS_NOW:
                    next_metrics, item = 0.0, ()
                if item:
                    frontend, message = item
                    frame = wire.pack(message)
                    for i in (range(len(sockets)) if frontend is None else (frontend,)):
                        sockets[i].send(frame)
                now = time.monotonic()
                if now >= next_metrics:
                    next_metrics = now + METRICS_PERIOD_S
                    self._send_metrics(sockets)
                    if os.getppid() != self._parent:
                        log.error("the server process is gone; the engine process exits")
                        os._exit(1)
        finally:
            for s in sockets:
                s.close()

    def _send_metrics(self, sockets) -> None:
        try:
            frame = wire.pack([wire.METRICS, self._spec.epoch, wire.metrics_to_wire(self._metrics())])
        except RuntimeError:  # a counter changed size under us: the next period reads it
            return
        for s in sockets:
            s.send(frame)
