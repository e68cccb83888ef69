"""``optimus serve`` with the engine in its own process: the supervisor.

Processes: this one (supervisor, no HTTP, no torch), ONE engine process (``engine/core_proc``:
the step loop) and N HTTP front-ends (``server/frontend``) sharing the port. The supervisor is
the only authority on the engine process's life; it tells every front-end over a pipe when an
engine process starts (``("engine", epoch, pid)``) and when one is lost
(``("engine_lost", epoch, restarting)``); a front-end's watchdog asks it to kill a hung one
(``("kill_engine", epoch, why)``).

- An engine process that dies after it was ready is started again, at most ``engine_restarts``
  times; the front-ends keep the requests it had not answered yet and submit them to the new
  one. Beyond that, or when it dies while the server shuts down, the front-ends end every
  request with ``engine_dead`` and exit; the server exits 1.
- An engine that fails to load ends the server: status 2 with one line when the cause is what
  the user gave (a missing model path, a bad option), else 1 (the engine's log has the traceback).
- SIGTERM or SIGINT: every front-end drains (stops admitting, lets running requests finish for
  ``--shutdown-timeout``, aborts the rest), then the engine process stops; exit 0. A second
  signal makes the front-ends exit at once.
- A front-end that exits on its own ends the server with status 1.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import wait

from optimus.config import EngineConfig, ServerConfig
from optimus.engine.core_proc import EngineProcSpec, engine_process_main
from optimus.server.frontend import FrontendSpec, frontend_main, shared_port_socket

log = logging.getLogger("optimus.server")

_POLL_S = 0.2
_ENGINE_STOP_S = 10.0


def default_frontends() -> int:
    """One HTTP front-end per four CPU cores, one to four: a front-end process keeps up with a
    few thousand SSE events a second; more than four compete with the engine for cores."""
    return max(1, min(4, (os.cpu_count() or 1) // 4))


@dataclass(frozen=True)
class ServePlan:
    engine_config: EngineConfig
    server_config: ServerConfig
    log_level: str = "info"
    factory: Callable[[EngineConfig], object] | None = None  # builds the Engine (test harnesses)

    @property
    def frontends(self) -> int:
        return self.server_config.front_ends or default_frontends()


class Supervisor:
    def __init__(self, plan: ServePlan) -> None:
        self.plan = plan
        self._mp = multiprocessing.get_context("spawn")
        self._ipc_dir = tempfile.mkdtemp(prefix="optimus-ipc-")
        self._metrics_dir = tempfile.mkdtemp(prefix="optimus-metrics-") if plan.frontends > 1 else None
        self._reserve = None  # keeps the port while front-ends come and go
        self._frontends: list[tuple[multiprocessing.Process, object]] = []
        self._engine = None
        self._engine_conn = None
        self._epoch = -1
        self._engine_ready = False  # the current engine process said it is ready
        self._engine_error: str | None = None
        self._restarts_left = plan.server_config.engine_restarts
        self._signals = 0
        self._stopping = False
        self.exit_code = 0

    # ---- start -------------------------------------------------------------------------
    def run(self) -> int:
        logging.basicConfig(level=self.plan.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            self._start_frontends()
            self._start_engine()
            self._loop()
        finally:
            self._cleanup()
        return self.exit_code

    def _start_frontends(self) -> None:
        config = self.plan.server_config
        self._reserve = shared_port_socket(config.host, config.port)
        config = replace(config, port=self._reserve.getsockname()[1])  # --port 0: the one picked
        count = self.plan.frontends
        log.info("%d HTTP front-end process%s on port %d, the engine in its own process", count,
                 "" if count == 1 else "es", config.port)
        for index in range(count):
            mine, theirs = self._mp.Pipe()
            spec = FrontendSpec(index, count, self._ipc_dir, self.plan.engine_config, config, self.plan.log_level,
                                self._metrics_dir)
            proc = self._mp.Process(target=frontend_main, args=(spec, theirs), name=f"optimus-frontend-{index}")
            proc.start()
            theirs.close()
            self._frontends.append((proc, mine))

    def _start_engine(self) -> None:
        self._epoch += 1
        self._engine_ready, self._engine_error = False, None
        mine, theirs = self._mp.Pipe(duplex=False)
        spec = EngineProcSpec(self.plan.engine_config, self._ipc_dir, self._epoch, self.plan.frontends,
                              self.plan.factory, self.plan.log_level)
        self._engine = self._mp.Process(target=engine_process_main, args=(spec, theirs), name="optimus-engine")
        self._engine.start()
        theirs.close()
        self._engine_conn = mine
        log.info("engine process %d started (epoch %d)", self._engine.pid, self._epoch)
        self._tell(("engine", self._epoch, self._engine.pid))

    # ---- watch -------------------------------------------------------------------------
    def _loop(self) -> None:
        while self._frontends:
            waitables = [self._engine.sentinel] if self._engine is not None else []
            waitables += [conn for _, conn in self._frontends] + [proc.sentinel for proc, _ in self._frontends]
            if self._engine_conn is not None:
                waitables.append(self._engine_conn)
            for ready in wait(waitables, timeout=_POLL_S):
                if ready is self._engine_conn:
                    self._from_engine()
                elif self._engine is not None and ready == self._engine.sentinel:
                    self._engine_exited()
                else:
                    self._from_frontend(ready)
        self._stop_engine()

    def _from_engine(self) -> None:
        try:
            message = self._engine_conn.recv()
        except (EOFError, OSError):
            self._engine_conn = None
            return
        if message[0] == "ready":
            self._engine_ready = True
        elif message[0] == "error":
            self._engine_error = message[1]

    def _from_frontend(self, ready) -> None:
        for proc, conn in list(self._frontends):
            if ready is conn:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    continue
                if message[0] == "kill_engine" and message[1] == self._epoch and self._engine is not None:
                    log.error("killing the engine process (pid %d): %s", self._engine.pid, message[2])
                    self._engine.kill()
            elif ready == proc.sentinel:
                proc.join()
                self._frontends.remove((proc, conn))
                if proc.exitcode != 0 and not self._stopping:
                    log.error("front-end %s exited with status %s; stopping the server", proc.name, proc.exitcode)
                if proc.exitcode != 0:
                    self.exit_code = self.exit_code or 1
                self._begin_stop()

    def _engine_exited(self) -> None:
        proc = self._engine
        proc.join()
        self._engine = None
        code = proc.exitcode
        while self._engine_conn is not None and self._engine_conn.poll():  # its last words
            self._from_engine()
        self._engine_conn = None
        if not self._engine_ready:
            self._load_failed(code)
        elif self._stopping or self._restarts_left <= 0:
            log.error("engine process exited with status %s; no restart left: the server exits", code)
            self.exit_code = 1
            self._tell(("engine_lost", self._epoch, False))
            self._begin_stop()
        else:
            self._restarts_left -= 1
            log.error("engine process exited with status %s; starting a new one (%d restart%s left), "
                      "queued requests wait for it", code, self._restarts_left, "" if self._restarts_left == 1 else "s")
            self._tell(("engine_lost", self._epoch, True))
            self._start_engine()

    def _load_failed(self, code: int | None) -> None:
        message = self._engine_error or f"the engine process exited with status {code} while loading"
        if code == 2:
            print(f"optimus serve: error: {message}", file=sys.stderr, flush=True)
            self.exit_code = 2
        else:
            log.error("the model failed to load: %s", message)
            self.exit_code = 1
        self._tell(("engine_failed", message) if self._epoch == 0 else ("engine_lost", self._epoch, False))
        self._begin_stop()

    # ---- stop --------------------------------------------------------------------------
    def _on_signal(self, sig: int, frame) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("received %s: draining every front-end", signal.Signals(sig).name)
        self._stopping = True
        for proc, _ in self._frontends:  # the second signal makes them exit at once
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    def _begin_stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        for proc, _ in self._frontends:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    def _stop_engine(self) -> None:
        proc = self._engine
        if proc is None:
            return
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGTERM)
        proc.join(_ENGINE_STOP_S)
        if proc.is_alive():
            log.error("the engine process did not stop in %.0fs; killing it", _ENGINE_STOP_S)
            proc.kill()
            proc.join()

    def _tell(self, message: tuple) -> None:
        for _, conn in self._frontends:
            try:
                conn.send(message)
            except OSError:
                pass

    def _cleanup(self) -> None:
        deadline = time.monotonic() + 5
        for proc, _ in self._frontends:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
        self._stop_engine()
        if self._reserve is not None:
            self._reserve.close()
        for folder in (self._ipc_dir, self._metrics_dir):
            if folder:
                shutil.rmtree(folder, ignore_errors=True)


def serve_processes(plan: ServePlan) -> int:
    return Supervisor(plan).run()
