"""App factory: one FastAPI app over one engine, with its own metrics registry and lifecycle."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from optimus import __version__
from optimus.config import ServerConfig
from optimus.server import admin_routes, openai_routes, tokenizer_info
from optimus.server.engine_client import EngineClient
from optimus.server.errors import install_error_handlers
from optimus.server.lifecycle import Lifecycle
from optimus.server.metrics import ServerMetrics
from optimus.server.middleware import ApiKeyAuth, BodyLimit
from optimus.server.origin import HostOriginGuard, OriginPolicy
from optimus.server.state import ServerState
from optimus.server.ui import make_ui_router


def build_app(engine: EngineClient, config: ServerConfig | None = None,
              on_fatal: Callable[[], None] | None = None, frontend: int = 0) -> FastAPI:
    """``engine`` follows the AsyncEngine contract and is started by the app's lifespan, in the
    background: the server answers (health 503) while the model loads."""
    config = config or ServerConfig()
    lifecycle = Lifecycle(engine, config, on_fatal=on_fatal)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await lifecycle.startup()
        yield
        await lifecycle.close()

    app = FastAPI(title="Optimus", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API over a diffusion-LLM engine")
    app.state.optimus = ServerState(engine=engine, config=config, metrics=ServerMetrics(engine),
                                    lifecycle=lifecycle, frontend=frontend)
    install_error_handlers(app)
    app.include_router(openai_routes.router)
    app.include_router(admin_routes.router)
    app.include_router(tokenizer_info.router)
    app.include_router(make_ui_router())  # the web page: GET /, /ui/*
    # built here, not by add_middleware (which builds lazily), so a bad entry fails at start-up
    origin_policy = OriginPolicy.build(config.host, config.allowed_hosts, config.allowed_origins)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    if config.api_key:
        app.add_middleware(ApiKeyAuth, api_key=config.api_key)  # runs before BodyLimit
    app.add_middleware(HostOriginGuard, policy=origin_policy)  # added last: runs first
    return app
