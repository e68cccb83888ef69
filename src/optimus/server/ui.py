"""The web page (``GET /``) and the two endpoints it uses:

- ``POST /ui/generate`` streams one answer as server-sent events, each ``data: {json}``:
  ``start`` (canvas layout), ``commit`` (one per engine commit event: step, chunk window,
  positions and their token strings), ``text`` (the answer's committed prefix), then ``done``
  (finish reason and the request's decoding stats) or ``error``.
- ``GET /ui/gauges``: an engine snapshot (running, waiting, KV usage, cumulative steps, tokens
  committed and chunk-size choices); the page differentiates successive snapshots.

Canvas coordinates: offset 0 is the first answer position; blocks start at offsets ``i`` with
``(i + block_phase) % block_size == 0``; the canvas runs to the end of the last block, so it can
be longer than ``max_tokens`` (those tail positions are decoded but never returned)."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, field_validator

from optimus.core.params import SamplingParams
from optimus.server.engine_client import EngineClient
from optimus.server.errors import from_engine_error
from optimus.server.prompts import completion_prompts, render_chat, resolve_max_tokens
from optimus.server.protocol import param_error, require_unicode

STATIC_DIR = Path(__file__).parent / "static"
ASSETS = {"ui.js": "text/javascript", "ui.css": "text/css"}  # what /ui/assets/ may serve


class UIGenerateRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=8000)
    max_tokens: int = Field(64, ge=1, le=512)
    policy: str | None = None  # ar | fixed:C | elastic; None = the server's
    chat: bool = True  # wrap the prompt in the model's chat template when it has one
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    ignore_eos: bool = False

    _text_is_unicode = field_validator("prompt", mode="before")(classmethod(lambda cls, v: require_unicode(v)))


def make_ui_router() -> APIRouter:
    """Routes of the page; they read the app's ``ServerState`` (``app.state.optimus``), so the
    page is refused exactly where the API is (loading, draining, prompt over the context)."""
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @router.get("/ui/assets/{name}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        if name not in ASSETS:
            raise HTTPException(404, "no such asset")
        return FileResponse(STATIC_DIR / name, media_type=ASSETS[name])

    @router.get("/ui/gauges")
    async def gauges(request: Request) -> JSONResponse:
        return JSONResponse(gauge_snapshot(request.app.state.optimus.engine))

    @router.post("/ui/generate")
    async def generate(body: UIGenerateRequest, request: Request) -> StreamingResponse:
        state = request.app.state.optimus
        state.admit(None)
        engine, limits = state.engine, state.limits()
        text = body.prompt
        if body.chat and engine.tokenizer.has_chat_template:
            text = render_chat([{"role": "user", "content": text}], engine.tokenizer)
        ids = completion_prompts(text, engine.tokenizer, limits)[0]
        max_tokens = resolve_max_tokens(body.max_tokens, len(ids), limits, None)
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                                    policy=body.policy or None, ignore_eos=body.ignore_eos)
        except (ValueError, TypeError) as exc:
            raise param_error(str(exc)) from None
        return StreamingResponse(canvas_stream(engine, ids, params), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router


def canvas_layout(engine: EngineClient, prompt_len: int, max_tokens: int) -> dict:
    from optimus.core.request import make_geometry

    g = make_geometry(engine.spec, engine.block_size, prompt_len, max_tokens)
    return {"canvas": g.canvas_end - g.canvas_start, "block_size": g.block_size,
            "block_phase": (g.canvas_start - g.block_origin) % g.block_size}


async def canvas_stream(engine: EngineClient, ids: list[int], params: SamplingParams) -> AsyncIterator[str]:
    """SSE frames of one request; closing the stream early aborts the engine request."""
    request_id = f"ui-{uuid.uuid4().hex[:12]}"
    t0 = time.monotonic()
    tok = engine.tokenizer
    yield _sse({"type": "start", "request_id": request_id, "prompt_tokens": len(ids),
                "max_tokens": params.max_tokens, **canvas_layout(engine, len(ids), params.max_tokens)})
    text = ""
    try:
        async with contextlib.aclosing(engine.generate(request_id, ids, params, events=True)) as outputs:
            async for out in outputs:
                for e in out.events:
                    yield _sse({"type": "commit", "step": e.step, "chunk": [e.chunk_start, e.chunk_end],
                                "positions": list(e.positions),
                                "tokens": [tok.decode([t], skip_special_tokens=False) for t in e.token_ids],
                                "t": round(time.monotonic() - t0, 4)})
                if out.text != text:
                    text = out.text
                    yield _sse({"type": "text", "text": text, "n": len(out.token_ids)})
                if out.finished:
                    yield _sse({"type": "done", "finish_reason": out.finish_reason, "text": out.text,
                            "answer_tokens": len(out.token_ids),
                                "elapsed_s": round(time.monotonic() - t0, 4), **request_stats(out.stats)})
    except Exception as exc:  # headers are sent: errors travel as a frame, internals stay in the log
        yield _sse({"type": "error", "message": from_engine_error(exc).message})


def request_stats(stats) -> dict:
    return {"steps": stats.steps, "tokens_committed": stats.tokens_committed,
            "tokens_computed": stats.tokens_computed, "tokens_per_step": round(stats.tokens_per_step, 3),
            "chunk_sizes": {str(c): n for c, n in sorted(stats.chunk_sizes.items())}}


def gauge_snapshot(engine: EngineClient) -> dict:
    if engine is None or not getattr(engine, "ready", False):
        return {"ready": False}
    m = engine.metrics()
    return {"ready": bool(getattr(engine, "alive", True)), "running": m.running, "waiting": m.waiting,
            "kv_usage": m.kv_usage, "steps": m.steps, "tokens_committed": m.tokens_committed,
            "tokens_computed": m.tokens_computed, "last_step_ms": round(1000 * m.last_step_latency_s, 3),
            "chunk_size_counts": {str(c): n for c, n in sorted(m.chunk_size_counts.items())},
            "time": time.time()}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
