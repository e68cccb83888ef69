"""Health, version, models, metrics and tokenizer endpoints."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from optimus import __version__
from optimus.server.errors import bad_request
from optimus.server.metrics import CONTENT_TYPE
from optimus.server.prompts import render_chat
from optimus.server.protocol import DetokenizeRequest, TokenizeRequest, chat_dicts
from optimus.server.state import ServerState

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.optimus


@router.get("/health")
async def health(request: Request) -> Response:
    phase = _state(request).lifecycle.phase
    if phase == "ready":
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": phase}, status_code=503, headers={"Retry-After": "5"})


@router.get("/version")
async def version() -> dict:
    return {"version": __version__}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    state = _state(request)
    state.admit(None)
    card = {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "optimus",
            "root": state.engine.model_name, "parent": None, "max_model_len": state.engine.max_model_len}
    return {"object": "list", "data": [card]}


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    state = _state(request)
    state.admit(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give exactly one of 'prompt' and 'messages'", "prompt")
    tokenizer = state.engine.tokenizer
    if body.messages is not None:
        text = render_chat(chat_dicts(body.messages), tokenizer, add_generation_prompt=body.add_generation_prompt)
    else:
        text = body.prompt
    # add_special_tokens unset: as /v1/completions tokenizes a prompt (the tokenizer's plain encode)
    ids = list(tokenizer.encode(text, add_special_tokens=True) if body.add_special_tokens else tokenizer.encode(text))
    strs = [tokenizer.id_to_token(i) for i in ids] if body.return_token_strs else None
    return {"tokens": ids, "count": len(ids), "max_model_len": state.engine.max_model_len, "token_strs": strs}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    state = _state(request)
    state.admit(body.model)
    vocab = state.engine.spec.arch.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"tokens: token id {bad} is outside the vocabulary [0, {vocab})", "tokens")
    return {"prompt": state.engine.tokenizer.decode(body.tokens, skip_special_tokens=False)}

