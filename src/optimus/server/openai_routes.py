"""``/v1/completions`` and ``/v1/chat/completions``: validate, plan the engine requests
(one per prompt and choice), then answer in one JSON body or as an SSE stream."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from optimus.server.connection import ClientDisconnected, cancel_on_disconnect
from optimus.server.errors import bad_request
from optimus.server.generation import Choice, Generation
from optimus.server.prompts import (COMPLETION_DEFAULT_MAX_TOKENS, call_token_budget, chat_prompt,
                                    check_stop_token_ids, completion_prompts, resolve_max_tokens)
from optimus.server.protocol import ChatCompletionRequest, CompletionRequest, GenerationRequest
from optimus.server.responses import ResponseMeta, completion_body
from optimus.server.scored import scored_completion
from optimus.server.state import ServerState
from optimus.server.streaming import event_stream

router = APIRouter()

MAX_ENGINE_REQUESTS_PER_CALL = 256  # prompts x n of one call
_CLIENT_CLOSED = 499  # nginx's code; nobody reads it, the client is gone


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state: ServerState = request.app.state.optimus
    state.admit(body.model)
    body.reject_unsupported()
    state.check_n(body.n)
    prompts = completion_prompts(body.prompt, state.engine.tokenizer, state.limits())
    if body.scored:  # echo / logprobs: generate (unless max_tokens is 0), then score
        meta = ResponseMeta(model=state.model_id, chat=False)
        _check_fan_out(len(prompts), body.n)
        choices = _plan(body, prompts, state, meta, COMPLETION_DEFAULT_MAX_TOKENS) if body.max_tokens != 0 else []
        return await scored_completion(state, request, body, prompts, meta, choices)
    return await _respond(state, request, body, prompts, chat=False, default_max=COMPLETION_DEFAULT_MAX_TOKENS)


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state: ServerState = request.app.state.optimus
    state.admit(body.model)
    body.reject_unsupported()
    state.check_n(body.n)
    prompts = [chat_prompt(body.chat(), state.engine.tokenizer, state.limits())]
    return await _respond(state, request, body, prompts, chat=True, default_max=None)


def _plan(body: GenerationRequest, prompts: list[list[int]], state: ServerState, meta: ResponseMeta,
          default_max: int | None) -> list[Choice]:
    """One engine request per (prompt, choice), every field checked against the model first."""
    sequences = _check_fan_out(len(prompts), body.n)
    limits = state.limits()
    check_stop_token_ids(body.stop_token_ids, limits)
    budget = call_token_budget(body.requested_max_tokens(), sequences, state.config.max_call_tokens)
    default = budget if default_max is None else min(default_max, budget)
    choices = []
    for p, ids in enumerate(prompts):
        max_tokens = resolve_max_tokens(body.requested_max_tokens(), len(ids), limits, default)
        for sample in range(body.n):
            index = p * body.n + sample
            choices.append(Choice(index=index, request_id=f"{meta.id}-{index}", prompt_ids=tuple(ids),
                                  params=body.sampling_params(max_tokens, choice=sample)))
    return choices


def _check_fan_out(prompts: int, n: int) -> int:
    if prompts * n > MAX_ENGINE_REQUESTS_PER_CALL:
        raise bad_request(f"prompt: {prompts} prompts x n={n} exceeds "
                          f"{MAX_ENGINE_REQUESTS_PER_CALL} completions per request", "prompt")
    return prompts * n


async def _respond(state: ServerState, request: Request, body: GenerationRequest, prompts: list[list[int]],
                   *, chat: bool, default_max: int | None) -> Response:
    meta = ResponseMeta(model=state.model_id, chat=chat)
    state.metrics.frontend_calls.labels(str(state.frontend)).inc()
    generation = Generation(state.engine, _plan(body, prompts, state, meta, default_max), state.metrics,
                            group=meta.id, stream_interval=state.config.stream_interval if body.stream else 1)
    state.lifecycle.track(generation)
    prompt_tokens = sum(len(p) for p in prompts)
    streaming = False
    try:
        await cancel_on_disconnect(request, generation.start())
        if body.stream:
            stream = event_stream(meta, generation, prompt_tokens, body.include_usage)
            streaming = True  # from here the stream (or its background task) closes the generation
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(generation.close))
        outputs = await cancel_on_disconnect(request, generation.final_outputs())
        return JSONResponse(completion_body(meta, outputs, prompt_tokens))
    except ClientDisconnected:
        return Response(status_code=_CLIENT_CLOSED)
    finally:
        if not streaming:
            generation.close()
