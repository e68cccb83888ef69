"""``optimus serve``: the OpenAI-compatible HTTP server. By default the engine's step loop runs
in its own process and HTTP front-end processes talk to it (``server/processes.py``);
``--no-engine-process`` keeps the loop in a thread of the one server process; ``--replicas N``
(N > 1) puts N engines on Ray Serve behind one ingress (``replicas/launch.py``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from optimus.config import EngineConfig, ServerConfig, add_config_args, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, EngineConfig)
    add_config_args(parser, ServerConfig)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="server log level; debug also logs the access lines of /health, /metrics and "
                             "the web page's /ui/gauges polls (default: info)")


def serve(engine_config: EngineConfig, server_config: ServerConfig, log_level: str = "info",
          factory: Callable[[EngineConfig], object] | None = None) -> int:
    """Run the server until a signal; the exit status. ``factory`` builds the Engine (harnesses)."""
    if server_config.replicas > 1:
        if factory is not None:
            raise ValueError("--replicas builds its engines in Ray actors: no engine factory")
        from optimus.replicas.launch import serve_replicas
        return serve_replicas(engine_config, server_config, log_level)
    if server_config.engine_process:
        from optimus.server.processes import ServePlan, serve_processes
        return serve_processes(ServePlan(engine_config, server_config, log_level, factory))
    from optimus.engine.async_engine import AsyncEngine
    from optimus.server.runner import run_server
    return run_server(AsyncEngine(engine_config, factory=factory), server_config, log_level=log_level)


def run(args: argparse.Namespace) -> int:
    from optimus.models.sources import resolve_model

    config = config_from_args(EngineConfig, args)
    # Find (download) and check the model before listening: a model that cannot be had ends
    # the command with one line (exit 2) instead of failing in the background after start-up.
    resolve_model(config.model.model, config.model.revision)
    return serve(config, config_from_args(ServerConfig, args), args.log_level)
