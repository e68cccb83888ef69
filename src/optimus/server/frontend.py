"""An HTTP front-end process: the usual app and uvicorn server over a ``RemoteEngine``.

Several front-ends share one port through ``SO_REUSEPORT`` (the kernel spreads connections over
them). With more than one, request-side metrics (token counters, latency histograms) are kept
in Prometheus's multiprocess files and every front-end's ``/metrics`` sums all of them; the
engine-side series come from the one engine process, so any front-end's scrape is the server's.

This module imports nothing heavy at import time: the spawned process must set
``PROMETHEUS_MULTIPROC_DIR`` before ``prometheus_client`` is first imported."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

from optimus.config import EngineConfig, ServerConfig

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@dataclass(frozen=True)
class FrontendSpec:
    index: int
    count: int
    ipc_dir: str
    engine_config: EngineConfig
    server_config: ServerConfig  # its port is the one the supervisor reserved
    log_level: str = "info"
    metrics_dir: str | None = None  # Prometheus multiprocess directory (several front-ends)


def shared_port_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` that other processes of this user may bind too."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    return sock


def frontend_main(spec: FrontendSpec, conn) -> None:
    """Target of a spawned front-end process; ``conn`` is its pipe to the supervisor."""
    os.setpgrp()  # signals come from the supervisor, which drains every front-end at once
    if spec.metrics_dir is not None:
        os.environ[MULTIPROC_ENV] = spec.metrics_dir
    from optimus.engine.remote import RemoteEngine
    from optimus.server.runner import run_server

    engine = RemoteEngine(spec.engine_config, spec.ipc_dir, spec.index, conn)
    config = spec.server_config
    sock = shared_port_socket(config.host, config.port)
    code = run_server(engine, config, spec.log_level, sockets=[sock], frontend=spec.index)
    sys.exit(code)
