"""Helpers for the server tests (this file holds no tests).

- ``ServerProcess``: a real ``optimus serve`` (or this file's harness) in a subprocess on a
  free port, with its log captured.
- Harness (``python tests/test_server_support.py --startup-delay S --step-delay D [serve flags]``):
  the real server over the real engine, whose ``start()`` first sleeps S seconds, so tests can
  watch health answer 503 while the model "loads", and whose every step takes at least D seconds,
  so how many steps fit in a time window does not depend on how fast the machine is.
- ``FakeEngine``: an in-process stand-in following the AsyncEngine contract, for what a real
  engine cannot be made to do on demand (hang a step, fail mid-stream).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from optimus.bench.server_process import free_port
from optimus.engine.stats import EngineMetrics

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


class ServerProcess:
    """``argv`` after the interpreter; the port flag is appended. Use as a context manager."""

    def __init__(self, argv: list[str], log_path: Path, api_key: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, *argv, "--port", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, timeout: float = 30.0) -> None:
        self._wait(lambda r: True, timeout)

    def wait_healthy(self, timeout: float = 60.0) -> None:
        self._wait(lambda r: r.status_code == 200, timeout)

    def _wait(self, done, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if done(httpx.get(self.url + "/health", timeout=1.0)):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not up after {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_argv(model_dir: Path, *flags: str) -> list[str]:
    return ["-m", "optimus.cli", "serve", "--model", str(model_dir), "--device", "cpu", *flags]


def harness_argv(model_dir: Path, startup_delay: float, *flags: str, step_delay: float = 0.0) -> list[str]:
    return [str(Path(__file__).resolve()), "--startup-delay", str(startup_delay), "--step-delay", str(step_delay),
            "--model", str(model_dir), "--device", "cpu", *flags]


def sse_events(lines) -> list:
    """Parse ``data:`` frames; '[DONE]' stays a string, the rest are JSON objects."""
    import json

    events = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# ---------------------------------------------------------------- fake engine

@dataclass(frozen=True)
class _Arch:
    vocab_size: int = 256


@dataclass(frozen=True)
class _Spec:
    arch: _Arch = field(default_factory=_Arch)


class ByteTokenizer:
    eos_token_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) for i in ids).decode(errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        turns = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return turns + ("<assistant>" if add_generation_prompt else "")


class FakeEngine:
    """Emits ``max_tokens`` copies of 'a', one per ``token_delay`` s. Knobs: ``hang`` makes
    metrics report a step that started long ago; ``fail_after`` raises after that many outputs."""

    def __init__(self, token_delay: float = 0.01, fail_after: int | None = None, start_delay: float = 0.0):
        self.token_delay = token_delay
        self.fail_after = fail_after
        self.start_delay = start_delay
        self.ready = False
        self.alive = True
        self.hang = False
        self.tokenizer = ByteTokenizer()
        self.spec = _Spec()
        self.model_name = "fake"
        self.max_model_len = 512
        self.block_size = 4
        self.aborted: set[str] = set()
        self.live: set[str] = set()

    async def start(self) -> None:
        await asyncio.sleep(self.start_delay)
        self.ready = True

    async def generate(self, request_id, prompt_token_ids, params, group=None, events=False):
        from optimus.core.outputs import RequestOutput, RequestStats

        self.live.add(request_id)
        try:
            for n in range(1, params.max_tokens + 1):
                await asyncio.sleep(self.token_delay)
                if self.fail_after is not None and n > self.fail_after:
                    raise RuntimeError("simulated engine failure")
                aborted = request_id in self.aborted
                done = aborted or n == params.max_tokens
                reason = "abort" if aborted else ("length" if done else None)
                yield RequestOutput(request_id, tuple(prompt_token_ids), (97,) * n, "a" * n, done, reason,
                                    RequestStats())
                if done:
                    return
        finally:
            self.live.discard(request_id)

    def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)

    def stop_admitting(self) -> None:
        pass

    async def drain(self, timeout: float) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    def mark_dead(self, why: str) -> None:
        self.alive = False

    def metrics(self) -> EngineMetrics:
        started = time.monotonic() - 3600 if self.hang else None
        return EngineMetrics(running=len(self.live), last_step_started=started)


# ---------------------------------------------------------------- harness

def slowed_engine(startup_delay: float, step_delay: float, config):
    """Builds the real Engine after ``startup_delay`` s (the model takes that long to 'load');
    every step then sleeps ``step_delay`` s first. Runs where the engine runs: the engine
    process, or a thread of the server process with ``--no-engine-process``."""
    from optimus.engine.engine import Engine

    time.sleep(startup_delay)
    engine = Engine(config)
    if step_delay > 0:
        step = engine.step

        def slow_step():
            time.sleep(step_delay)
            return step()

        engine.step = slow_step
    return engine


def _harness_main(argv: list[str]) -> int:
    import argparse
    import functools

    sys.path.insert(0, str(SRC))
    from optimus.commands.serve import add_arguments, serve
    from optimus.config import EngineConfig, ServerConfig, config_from_args

    parser = argparse.ArgumentParser()
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument("--step-delay", type=float, default=0.0)
    add_arguments(parser)
    args = parser.parse_args(argv)
    factory = functools.partial(slowed_engine, args.startup_delay, args.step_delay)
    return serve(config_from_args(EngineConfig, args), config_from_args(ServerConfig, args), args.log_level,
                 factory=factory)


if __name__ == "__main__":
    sys.exit(_harness_main(sys.argv[1:]))
