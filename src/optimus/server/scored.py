"""``echo`` and ``logprobs`` on ``/v1/completions`` (what lm-eval's ``local-completions``
sends for loglikelihood: ``echo: true, logprobs: 1, max_tokens: 1``; ``max_tokens: 0`` scores
the prompt alone).

Each choice is generated as usual, then scored by the engine (``EngineClient.score``):

* the prompt (with ``echo``): every token after the first given the tokens before it; the
  first token's logprob is null, as OpenAI returns it;
* the completion (with ``logprobs``): its tokens given the prompt, plus the stop token that
  ended it (eos or a ``stop_token_ids`` entry: it is not in the text, but OpenAI and vLLM
  report it, and lm-eval drops the last entry as the generated one).

Causal models: exact log-probabilities, one sequence per choice. Diffusion models
(``decoding/likelihood.py``): the server cannot know where a prompt's context ends (lm-eval
sends context + continuation as one prompt and sums ``token_logprobs[ctxlen:-1]``), so each
prompt token is scored as a one-token continuation of the tokens before it (exact, no
sampling; a span's sum is ``sum log p(x_i | x_<i)`` whatever its start). A completion, whose
context is the prompt, gets the model's estimator (block-diffusion ELBO or LLaDA's Monte Carlo
estimate) given the prompt, each token its share of the estimate.
"""

from __future__ import annotations

import asyncio
import re
from collections import defaultdict
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from optimus.core.scoring import ScoreRequest, ScoreResult
from optimus.models.detokenizer import IncrementalDetokenizer
from optimus.server.connection import ClientDisconnected, cancel_on_disconnect
from optimus.server.errors import bad_request, from_engine_error
from optimus.server.generation import Choice, Generation
from optimus.server.protocol import CompletionRequest
from optimus.server.responses import ResponseMeta, usage
from optimus.server.state import ServerState

_CLIENT_CLOSED = 499
_SEQUENCE_ERROR = re.compile(r"^sequence (\d+): (.*)$", re.S)


@dataclass(frozen=True)
class _Answer:
    """One choice's completion as returned, and the stop token that ended it (if any)."""

    ids: tuple[int, ...] = ()
    text: str = ""
    finish_reason: str = "length"
    stop_token: int | None = None

    @property
    def scored(self) -> tuple[int, ...]:
        return self.ids + ((self.stop_token,) if self.stop_token is not None else ())


async def scored_completion(state: ServerState, request: Request, body: CompletionRequest,
                            prompts: list[list[int]], meta: ResponseMeta, choices: list[Choice]) -> Response:
    """``choices``: the planned engine requests (none when ``max_tokens`` is 0)."""
    generation = Generation(state.engine, choices, state.metrics, group=meta.id) if choices else None
    try:
        if generation is None:
            answers = [_Answer() for _ in range(len(prompts) * body.n)]
        else:
            state.lifecycle.track(generation)
            await cancel_on_disconnect(request, generation.start())
            answers = await cancel_on_disconnect(request, _answers(generation, state.engine.spec))
        scores = None
        if body.logprobs is not None:
            scores = await cancel_on_disconnect(request, _score(state, body, prompts, answers))
    except ClientDisconnected:
        return Response(status_code=_CLIENT_CLOSED)
    finally:
        if generation is not None:
            generation.close()
    # decoding every token and alternative takes a while on long prompts: off the event loop
    out = await asyncio.to_thread(_choices, state.engine.tokenizer, body, prompts, answers, scores)
    completion_tokens = sum(len(a.ids) for a in answers)
    return JSONResponse({**meta.head(streaming=False), "choices": out,
                         "usage": usage(sum(len(p) for p in prompts), completion_tokens)})


def _choices(tokenizer, body: CompletionRequest, prompts: list[list[int]], answers: list[_Answer], scores) -> list:
    out = []
    for index, answer in enumerate(answers):
        text, lp = _choice_text_and_logprobs(tokenizer, body, prompts[index // body.n], answer, scores, index)
        out.append({"index": index, "text": text, "logprobs": lp, "finish_reason": answer.finish_reason})
    return out


async def _answers(generation: Generation, spec) -> list[_Answer]:
    """Final outputs, and the stop token each choice ended on (from its commit events: the
    engine trims it from ``token_ids``)."""
    last, commits = {}, defaultdict(dict)
    async for update in generation.updates():
        last[update.index] = update.output
        for event in update.output.events:
            commits[update.index].update(zip(event.positions, event.token_ids))
    answers = []
    for choice in generation.choices:
        out, p = last[choice.index], choice.params
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(spec.eos_ids))
        ended = commits[choice.index].get(len(out.token_ids)) if out.finish_reason == "stop" else None
        answers.append(_Answer(out.token_ids, out.text, out.finish_reason, ended if ended in stop_ids else None))
    return answers


class _Plan:
    """The sequences one call scores and where each choice's values come from."""

    def __init__(self, causal: bool) -> None:
        self.causal = causal
        self.sequences: list[tuple[int, ...]] = []
        self.context_lens: list[int] = []
        self.chained: list[bool] = []
        self.prompt_of: list[int] = []  # sequence -> prompt index (for error messages)
        self._keys: dict[tuple, int] = {}

    def add(self, key: tuple, tokens: tuple[int, ...], context_len: int, prompt: int, chained: bool = False) -> int:
        if key not in self._keys:
            self._keys[key] = len(self.sequences)
            self.sequences.append(tokens)
            self.context_lens.append(context_len)
            self.chained.append(chained)
            self.prompt_of.append(prompt)
        return self._keys[key]


async def _score(state: ServerState, body: CompletionRequest, prompts: list[list[int]],
                 answers: list[_Answer]) -> tuple[_Plan, dict[int, tuple[int | None, int | None]], ScoreResult]:
    """Score what the choices report. Per choice: (sequence of its prompt values, sequence of
    its completion values); a causal model scores both in one sequence."""
    if body.seed is not None and not 0 <= body.seed < 2**63:
        raise bad_request(f"seed: must be in [0, 2^63), got {body.seed}", "seed")
    plan = _Plan(causal=not state.engine.spec.is_diffusion)
    where: dict[int, tuple[int | None, int | None]] = {}
    for index, answer in enumerate(answers):
        p = index // body.n
        prompt = tuple(prompts[p])
        if plan.causal:
            full = prompt + answer.scored
            wanted = (body.echo and len(prompt) > 1) or answer.scored
            seq = plan.add(("full",) + full, full, 1, p) if wanted else None
            where[index] = (seq, seq)
            continue
        head = plan.add(("prompt", p), prompt, 1, p, chained=True) if body.echo and len(prompt) > 1 else None
        tail = plan.add(("answer", index), prompt + answer.scored, len(prompt), p) if answer.scored else None
        where[index] = (head, tail)
    if not plan.sequences:
        return plan, where, ScoreResult((), "none", 0)
    request = ScoreRequest(tuple(plan.sequences), tuple(plan.context_lens), top_n=body.logprobs, seed=body.seed,
                           chained=tuple(plan.chained))
    try:
        return plan, where, await state.engine.score(request)
    except ValueError as exc:
        raise _prompt_error(exc, plan) from None
    except Exception as exc:
        raise from_engine_error(exc) from None


def _prompt_error(exc: ValueError, plan: _Plan):
    named = _SEQUENCE_ERROR.match(str(exc))
    if named is None:
        return bad_request(f"prompt: {exc}", "prompt")
    p = plan.prompt_of[int(named.group(1))]
    param = "prompt" if len({*plan.prompt_of}) == 1 else f"prompt.{p}"
    return bad_request(f"{param}: {named.group(2)}", param, code="context_length_exceeded")


def _choice_text_and_logprobs(tokenizer, body: CompletionRequest, prompt: list[int], answer: _Answer,
                              scores, index: int) -> tuple[str, dict | None]:
    prompt_text = tokenizer.decode(prompt, skip_special_tokens=False) if body.echo else ""
    text = prompt_text + answer.text
    if scores is None:
        return text, None
    plan, where, result = scores
    head, tail = where[index]
    ids: list[int] = []
    values: list[float | None] = []
    tops: list[tuple | None] = []
    offsets: list[int] = []
    if body.echo:
        ids += prompt
        values.append(None)
        tops.append(None)
        offsets += _offsets(tokenizer, prompt, skip=False)
        if head is not None:
            _take(result, head, 0, len(prompt) - 1, values, tops)
    if answer.scored:
        ids += answer.scored
        skip = body.skip_special_tokens
        offsets += [min(len(prompt_text) + o, len(text)) for o in _offsets(tokenizer, list(answer.scored), skip)]
        first = len(prompt) - 1 if plan.causal else 0
        _take(result, tail, first, first + len(answer.scored), values, tops)
    return text, _logprobs_json(tokenizer, ids, values, tops, offsets)


def _take(result: ScoreResult, seq: int, lo: int, hi: int, values: list, tops: list) -> None:
    scores = result.sequences[seq]
    values += scores.logprobs[lo:hi]
    tops += list(zip(scores.top_ids[lo:hi], scores.top_logprobs[lo:hi]))


def _offsets(tokenizer, ids: list[int], skip: bool) -> list[int]:
    """Character offset of each token in the decoded text (a token that completes a character
    split across tokens starts where that character does)."""
    detok, seen, offsets = IncrementalDetokenizer(tokenizer, skip), [], []
    for token in ids:
        offsets.append(len(detok.update(seen)))
        seen.append(token)
    return offsets


def _logprobs_json(tokenizer, ids: list[int], values: list, tops: list, offsets: list[int]) -> dict:
    """OpenAI's completions ``logprobs``: per token its text, logprob, the top alternatives
    (vLLM's rule: the top N plus the token itself, best first) and its text offset."""
    def piece(token: int) -> str:
        # A token holding part of a character decodes to U+FFFD, like many others: its vocabulary
        # entry keeps the alternatives' keys apart.
        text = tokenizer.decode([token], skip_special_tokens=False)
        return (tokenizer.id_to_token(token) or text) if "\ufffd" in text else text

    tokens = [piece(t) for t in ids]
    top_logprobs = []
    for token, value, top in zip(tokens, values, tops):
        if value is None:
            top_logprobs.append(None)
            continue
        entries = {piece(i): v for i, v in zip(*top)}
        entries[token] = value
        top_logprobs.append(dict(sorted(entries.items(), key=lambda kv: -kv[1])))
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": top_logprobs, "text_offset": offsets}
