"""Run an app under uvicorn with Optimus's shutdown: the first SIGTERM/SIGINT stops admitting,
drains for ``shutdown_timeout`` s, aborts the rest (``finish_reason: abort``), then exits 0; a
second signal falls back to uvicorn's immediate shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

from optimus.config import ServerConfig
from optimus.server.app import build_app
from optimus.server.origin import is_loopback

log = logging.getLogger("optimus.server")

_FINISH_AFTER_DRAIN_S = 5.0  # responses are complete once drained; this bounds the last flush


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.lifecycle = None  # set once the app exists
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_requested = False

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        first = not self._drain_requested and not self.should_exit
        if first and self._loop is not None and self.lifecycle is not None:
            self._drain_requested = True
            log.info("received %s: draining", signal.Signals(sig).name)
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain_then_exit()))
            return
        super().handle_exit(sig, frame)

    def fatal(self) -> None:
        self.exit_code = 1
        self.should_exit = True

    async def _drain_then_exit(self) -> None:
        try:
            await self.lifecycle.drain()
        except Exception:
            log.exception("drain failed")
        finally:
            self.should_exit = True


def run_server(engine, config: ServerConfig, log_level: str = "info") -> int:
    """Serve ``engine`` until a signal; returns the process exit code."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    if not config.api_key and not is_loopback(config.host):
        log.warning("listening on %s:%d with no --api-key: anyone who can reach this port can use the model",
                    config.host, config.port)
    uv_config = uvicorn.Config(None, host=config.host, port=config.port, log_level=log_level,
                               timeout_graceful_shutdown=int(_FINISH_AFTER_DRAIN_S), lifespan="on")
    server = DrainingServer(uv_config)
    app = build_app(engine, config, on_fatal=server.fatal)
    uv_config.app = app
    server.lifecycle = app.state.optimus.lifecycle
    server.run()
    return server.exit_code
