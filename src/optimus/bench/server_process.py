"""Run ``optimus serve`` as a child process on a free local port for the length of a ``with``
block: wait for ``/health`` to answer 200, yield the base URL, then SIGTERM (drain) and reap."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy in time."""


@dataclass(frozen=True)
class ServerLaunch:
    model: str
    policy: str
    extra_args: tuple[str, ...] = ()  # more `optimus serve` flags, e.g. ("--num-pages", "512")
    host: str = "127.0.0.1"
    startup_timeout_s: float = 600.0
    log_dir: Path | None = None  # server output goes to LOG_DIR/server-<policy>.log

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "optimus.cli", "serve", "--model", self.model, "--policy", self.policy,
                "--host", self.host, "--port", str(port), *self.extra_args]


# Ports the kernel never hands out on its own (below its ephemeral range, 32768 up by default)
# and above Ray's default worker ports (10002-19999). A port the kernel picked (bind to 0) is free
# only until someone else asks: `serve --replicas` starts a local Ray instance before it binds,
# and Ray's processes took the picked port in a test run (errno 98, server exit 3).
QUIET_PORTS = range(20000, 32768)


def free_port(host: str = "127.0.0.1", rng: random.Random | None = None) -> int:
    """A port free on ``host`` now, from QUIET_PORTS where one is (else any the kernel picks)."""
    rng = rng or random.Random()
    for port in rng.sample(QUIET_PORTS, 64):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(launch: ServerLaunch) -> Iterator[str]:
    port = free_port(launch.host)
    log_path = _log_path(launch)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(launch.command(port), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        base_url = f"http://{launch.host}:{port}"
        try:
            _wait_healthy(base_url, proc, launch.startup_timeout_s, log_path)
            yield base_url
        finally:
            _stop(proc)


def _log_path(launch: ServerLaunch) -> Path:
    folder = launch.log_dir or Path(os.environ.get("TMPDIR", "/tmp"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"server-{launch.policy.replace(':', '')}.log"


def _wait_healthy(base_url: str, proc: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(f"the server exited with code {proc.returncode}; "
                                   f"log tail:\n{_tail(log_path)}")
        try:
            if httpx.get(base_url + "/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise ServerStartError(f"the server was not healthy after {timeout_s:.0f}s; log tail:\n{_tail(log_path)}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
