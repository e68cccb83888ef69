"""Run an app under uvicorn with Optimus's shutdown: the first SIGTERM/SIGINT stops admitting,
drains for ``shutdown_timeout`` s, aborts the rest (``finish_reason: abort``), then exits 0; a
second signal falls back to uvicorn's immediate shutdown.

Uvicorn reports that it listens at once, while the model still loads (and, on a first start,
the elastic policy measures this device); once the engine is ready one line gives the URL,
the web page, the model and the policy. Polled endpoints stay out of the access log."""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

from optimus.config import ServerConfig
from optimus.server.app import build_app
from optimus.server.engine_client import EngineClient
from optimus.server.origin import is_loopback

log = logging.getLogger("optimus.server")

_FINISH_AFTER_DRAIN_S = 5.0  # responses are complete once drained; this bounds the last flush
_READY_POLL_S = 0.2

# Probes, scrapers and the web page's gauges poll these every second or so: one access-log
# line each would bury the requests that matter. They are logged at --log-level debug.
QUIET_PATHS = frozenset({"/health", "/metrics", "/ui/gauges"})


class QuietPolls(logging.Filter):
    """Drops uvicorn access records (args: client, method, path, http version, status) for
    :data:`QUIET_PATHS`; a query string does not make a poll loud."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            return args[2].split("?", 1)[0] not in QUIET_PATHS
        return True


def quiet_polls(enabled: bool) -> None:
    """Install (or remove) the filter on uvicorn's access logger, once."""
    access = logging.getLogger("uvicorn.access")
    for f in [f for f in access.filters if isinstance(f, QuietPolls)]:
        access.removeFilter(f)
    if enabled:
        access.addFilter(QuietPolls())


def base_url(host: str, port: int) -> str:
    """Where a browser on this machine reaches the server: a wildcard bind is reachable on
    loopback; IPv6 literals take brackets."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def ready_line(url: str, model_id: str, policy: str) -> str:
    return f"ready: {url} (OpenAI API under /v1), web page {url}/, model {model_id}, policy {policy}"


def _policy(engine: EngineClient) -> str:
    config = getattr(engine, "config", None)
    return config.scheduler.policy if config is not None else "?"


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.lifecycle = None  # set once the app exists
        self.app_state = None  # the app's ServerState, for the ready line
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_requested = False

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        announce = asyncio.ensure_future(self._announce_when_ready())
        try:
            await super().serve(sockets)
        finally:
            announce.cancel()

    async def _announce_when_ready(self) -> None:
        """Log the ready line once the engine has loaded (the lifespan loads it in the background)."""
        if self.app_state is None:
            return  # another front-end announces
        while self.lifecycle.phase == "loading" or not self.started:
            await asyncio.sleep(_READY_POLL_S)
        if self.lifecycle.phase != "ready":
            return  # failed or shutting down: the lifecycle logged why
        state = self.app_state
        log.info(ready_line(base_url(self.config.host, self._bound_port()), state.model_id, _policy(state.engine)))

    def _bound_port(self) -> int:
        """The port listened on (``--port 0`` picks a free one)."""
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                return sock.getsockname()[1]
        return self.config.port

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


def run_server(engine: EngineClient, config: ServerConfig, log_level: str = "info", sockets=None,
               frontend: int = 0) -> int:
    """Serve ``engine`` until a signal; returns the process exit code. ``sockets``: bound
    listening sockets to serve on (front-end processes sharing a port); ``frontend``: which
    front-end process this is; only the first logs the start-up notes and the ready line."""
    announce = frontend == 0
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    if announce and not config.api_key and not is_loopback(config.host):
        log.warning("listening on %s:%d with no --api-key: anyone who can reach this port can use the model",
                    config.host, config.port)
    uv_config = uvicorn.Config(None, host=config.host, port=config.port, log_level=log_level,
                               timeout_graceful_shutdown=int(_FINISH_AFTER_DRAIN_S), lifespan="on")
    quiet_polls(log_level != "debug")  # after uvicorn.Config: it (re)configures uvicorn's loggers
    server = DrainingServer(uv_config)
    app = build_app(engine, config, on_fatal=server.fatal, frontend=frontend)
    uv_config.app = app
    server.lifecycle = app.state.optimus.lifecycle
    server.app_state = app.state.optimus if announce else None
    if announce:
        log.info("loading the model in the background (policy %s): /health answers 503 until the ready line",
                 _policy(engine))
    server.run(sockets=sockets) if sockets else server.run()
    return server.exit_code
