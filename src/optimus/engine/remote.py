"""RemoteEngine: the ``EngineClient`` of an HTTP front-end whose engine runs in its own process.

The front-end's event loop does all HTTP-side work: admission checks against the model,
detokenizing, SSE. Towards the engine it sends one small message per add or abort and reads one
STEP message per engine step (``wire``). The supervisor (``server/processes.py``) tells it over a
pipe when an engine process starts (its epoch) and when one is lost:

- lost and being restarted: requests whose consumer already saw output end with
  ``EngineDeadError`` (a new engine cannot resume them); the others stay queued here and are
  submitted again once the new engine is ready, so the queue survives the restart;
- lost for good: every request ends with ``EngineDeadError`` and ``on_dead`` runs (the front-end
  exits non-zero).

A non-streaming method of the engine is forwarded with one line: ``name = forwarded("name")``;
it runs as ``Engine.name(*args, **kwargs)`` in the engine process between two steps."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable

import zmq
import zmq.asyncio

from optimus.config import EngineConfig
from optimus.core.errors import EngineDeadError, EngineStartError, QueueFullError
from optimus.core.outputs import RequestOutput
from optimus.core.params import SamplingParams
from optimus.core.request import check_request
from optimus.engine import wire
from optimus.engine.core_proc import engine_path, frontend_path
from optimus.engine.remote_stream import RemoteStream
from optimus.engine.model_facts import ModelFactsView
from optimus.engine.stats import EngineMetrics
from optimus.models.detokenizer import IncrementalDetokenizer

log = logging.getLogger("optimus.server")


def forwarded(method: str):
    """An async method of RemoteEngine that runs ``Engine.<method>`` in the engine process."""
    async def call(self: "RemoteEngine", *args, **kwargs):
        return await self.call(method, *args, **kwargs)
    call.__name__ = method
    return call


class _Pages:
    """What ``check_request`` reads of the engine's page allocator."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        self.num_pages, self.page_size = num_pages, page_size

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)


class RemoteEngine(ModelFactsView):
    score = forwarded("score")  # likelihoods (lm-eval): run in pieces between the engine's steps

    def __init__(self, config: EngineConfig, ipc_dir: str, frontend: int, supervisor) -> None:
        self.config = config
        self.ready = False
        self.alive = True
        self.on_dead: Callable[[], None] | None = None
        self._ipc_dir, self._frontend, self._supervisor = ipc_dir, frontend, supervisor
        self._info: wire.EngineInfo | None = None
        self._epoch: int | None = None  # the engine process we talk to
        self._streams: dict[int, RemoteStream] = {}
        self._handles: dict[str, int] = {}  # request id -> handle
        self._next_handle = itertools.count()
        self._calls: dict[int, asyncio.Future] = {}
        self._next_call = itertools.count()
        self._metrics = EngineMetrics()
        self._admitting = True
        self._started: asyncio.Future | None = None
        self._ctx = zmq.asyncio.Context()
        self._inbox = self._ctx.socket(zmq.PULL)
        self._inbox.bind(frontend_path(ipc_dir, frontend))
        self._outbox: zmq.Socket | None = None
        self._sync_ctx = zmq.Context()
        self._reader: asyncio.Task | None = None

    # ---- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._started = loop.create_future()
        self._reader = asyncio.create_task(self._read(), name="optimus-engine-reader")
        loop.add_reader(self._supervisor.fileno(), self._from_supervisor)
        await self._started

    def stop_admitting(self) -> None:
        self._admitting = False

    async def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline and self.alive:
            await asyncio.sleep(0.05)
        for stream in list(self._streams.values()):
            self.abort(stream.request_id)
        while self._streams and self.alive and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.02)

    async def shutdown(self) -> None:
        try:
            asyncio.get_running_loop().remove_reader(self._supervisor.fileno())
        except (OSError, ValueError):
            pass
        if self._reader is not None:
            self._reader.cancel()
        self.close()

    def close(self) -> None:
        """Close the sockets (an open ZeroMQ context would hold the process at exit)."""
        self._ctx.destroy(linger=0)
        self._sync_ctx.destroy(linger=0)

    def mark_dead(self, why: str) -> None:
        """The watchdog saw a hung step: ask the supervisor to kill this engine process (it is
        then restarted, or the server exits)."""
        log.error("engine process hung: %s; asking the supervisor to replace it", why)
        self._tell_supervisor(("kill_engine", self._epoch, why))

    # ---- requests ----------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       group: str | None = None, events: bool = False) -> AsyncIterator[RequestOutput]:
        """As ``AsyncEngine.generate``; refusals raise at once, before the engine sees the request."""
        stream = self._admit(request_id, prompt_token_ids, params, group, events)
        done = False
        try:
            while True:
                try:
                    out = await stream.next()
                except BaseException:
                    done = True
                    raise
                done = out.finished
                yield out
                if done:
                    return
        finally:
            self._forget(stream)
            if not done:  # the consumer went away (client disconnect): free the request's pages
                self._abort(stream)

    def abort(self, request_id: str) -> None:
        handle = self._handles.get(request_id)
        if handle is not None:
            self._abort(self._streams[handle])

    def metrics(self) -> EngineMetrics:
        return self._metrics if self.ready else EngineMetrics()

    async def call(self, method: str, *args, **kwargs):
        """Run ``Engine.<method>(*args, **kwargs)`` in the engine process; its result or error."""
        if not self.ready:
            raise EngineDeadError("the engine is not running")
        if not self._admitting:
            raise QueueFullError("the server is shutting down and admits no new requests")
        call_id = next(self._next_call)
        future = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        self._send([wire.CALL, self._frontend, call_id, method, wire.dumps((args, kwargs))])
        try:
            return await future
        finally:
            self._calls.pop(call_id, None)

    def _admit(self, request_id, prompt_ids, params, group, events) -> RemoteStream:
        if not self.alive or self._info is None:
            raise EngineDeadError("the engine is not running")
        if not self._admitting:
            raise QueueFullError("the server is shutting down and admits no new requests")
        sc = self.config.scheduler
        if len(self._streams) >= sc.max_running + sc.max_waiting:
            raise QueueFullError(f"{len(self._streams)} requests are running or queued "
                                 f"(max-running {sc.max_running} + max-waiting {sc.max_waiting})")
        info = self._info
        check_request(info.spec, info.block_size, _Pages(info.num_pages, info.page_size), prompt_ids, params)
        if request_id in self._handles:
            raise ValueError(f"duplicate request id {request_id!r}")
        stream = RemoteStream(next(self._next_handle), request_id, tuple(prompt_ids), params, group, events,
                              IncrementalDetokenizer(info.tokenizer, params.skip_special_tokens))
        self._streams[stream.handle] = stream
        self._handles[request_id] = stream.handle
        if self.ready:
            self._submit(stream)
        return stream

    def _submit(self, stream: RemoteStream) -> None:
        stream.submitted_epoch = self._epoch
        self._send([wire.ADD, self._frontend, stream.handle, list(stream.prompt_ids),
                    wire.params_to_wire(stream.params), stream.group, stream.events_wanted])

    def _abort(self, stream: RemoteStream) -> None:
        if stream.finished or stream.error is not None:
            return
        if self.ready and stream.submitted_epoch == self._epoch:
            self._send([wire.ABORT, self._frontend, [stream.handle]])
        else:  # no engine holds it (waiting for a restarted one): end it here
            stream.finish_locally("abort")
            self._forget(stream)

    def _forget(self, stream: RemoteStream) -> None:
        if self._streams.pop(stream.handle, None) is not None:
            self._handles.pop(stream.request_id, None)

    def _send(self, message: list) -> None:
        if self._outbox is not None:
            self._outbox.send(wire.pack(message))

    # ---- what the engine process sends ---------------------------------------------------
    async def _read(self) -> None:
        while True:
            msg = wire.unpack(await self._inbox.recv())
            if msg[1] != self._epoch:
                continue  # an earlier engine process's leftovers
            try:
                self._on_message(msg)
            except Exception:
                log.exception("bad message from the engine process")

    def _on_message(self, msg: list) -> None:
        kind = msg[0]
        if kind == wire.STEP:
            streams = self._streams
            for handle, base, new, finish, extra in msg[2]:
                stream = streams.get(handle)
                if stream is not None:
                    stream.apply(base, new, finish, extra)
                    if stream.finished or stream.error is not None:
                        self._forget(stream)
        elif kind == wire.METRICS:
            self._metrics = wire.metrics_from_wire(msg[2])
        elif kind == wire.READY:
            self._on_ready(wire.loads(msg[2]))
        elif kind == wire.REPLY:
            future = self._calls.get(msg[2])
            if future is not None and not future.done():
                result = wire.loads(msg[4])
                future.set_result(result) if msg[3] else future.set_exception(result)

    def _on_ready(self, info: wire.EngineInfo) -> None:
        self._info = info
        self.ready = True
        for stream in list(self._streams.values()):
            if stream.submitted_epoch != self._epoch:  # kept across a restart: queue it again
                self._submit(stream)
        if self._started is not None and not self._started.done():
            self._started.set_result(None)

    # ---- what the supervisor says ------------------------------------------------------
    def _from_supervisor(self) -> None:
        try:
            message = self._supervisor.recv()
        except (EOFError, OSError):  # the supervisor is gone: nothing can restart the engine
            asyncio.get_running_loop().remove_reader(self._supervisor.fileno())
            self._lost(self._epoch, restarting=False)
            return
        kind = message[0]
        if kind == "engine":  # a new engine process (epoch, pid) is loading
            self._connect(message[1])
        elif kind == "engine_lost":
            self._lost(message[1], restarting=message[2])
        elif kind == "engine_failed" and self._started is not None and not self._started.done():
            self._started.set_exception(EngineStartError(message[1]))

    def _connect(self, epoch: int) -> None:
        if self._outbox is not None:
            self._outbox.close(linger=0)
        self._epoch = epoch
        self._outbox = self._sync_ctx.socket(zmq.PUSH)
        self._outbox.setsockopt(zmq.SNDHWM, 0)
        self._outbox.setsockopt(zmq.LINGER, 0)
        self._outbox.connect(engine_path(self._ipc_dir, epoch))

    def _lost(self, epoch: int | None, restarting: bool) -> None:
        if epoch != self._epoch:
            return
        self.ready = False
        self._metrics = EngineMetrics()
        for future in self._calls.values():
            if not future.done():
                future.set_exception(EngineDeadError("the engine stopped"))
        for stream in list(self._streams.values()):
            if stream.delivered or not restarting:
                stream.fail(EngineDeadError("the engine stopped"))
                self._forget(stream)
            else:
                stream.restart()  # submitted again when the next engine is ready
        if restarting:
            log.warning("engine process lost; %d queued requests wait for its replacement", len(self._streams))
            return
        self.alive = False
        if self.on_dead is not None:
            self.on_dead()

    def _tell_supervisor(self, message: tuple) -> None:
        try:
            self._supervisor.send(message)
        except (OSError, ValueError):
            pass
