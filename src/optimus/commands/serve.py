"""``optimus serve``: the OpenAI-compatible HTTP server over the async engine."""

from __future__ import annotations

import argparse

from optimus.config import EngineConfig, ServerConfig, add_config_args, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, EngineConfig)
    add_config_args(parser, ServerConfig)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="server log level; debug also logs the access lines of /health, /metrics and "
                             "the web page's /ui/gauges polls (default: info)")


def run(args: argparse.Namespace) -> int:
    from optimus.engine.async_engine import AsyncEngine
    from optimus.models.sources import resolve_model
    from optimus.server.runner import run_server

    config = config_from_args(EngineConfig, args)
    # Find (download) and check the model before listening: a model that cannot be had ends
    # the command with one line (exit 2) instead of failing in the background after start-up.
    resolve_model(config.model.model, config.model.revision)
    engine = AsyncEngine(config)
    return run_server(engine, config_from_args(ServerConfig, args), log_level=args.log_level)
