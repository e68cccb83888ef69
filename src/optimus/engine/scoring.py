"""A scoring request run in pieces between engine steps.

The loop thread owns the model, so scoring runs there: each ``advance()`` is one dense forward
of at most ``budget`` tokens (padded rows of the request's sequences, across its prompts), so a
large request never holds the engine's steps back by more than one such forward. The math is
in ``decoding/likelihood.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from optimus.core.scoring import ScoreRequest, ScoreResult
from optimus.decoding import likelihood as lk
from optimus.models.spec import ModelSpec

log = logging.getLogger(__name__)


def check_score_request(request: ScoreRequest, spec: ModelSpec, max_model_len: int, budget: int,
                        block: int) -> None:
    """Raise ValueError (``sequence i: why``) unless every sequence can be scored: ids in the
    vocabulary, within the context, and one forward row within the token budget."""
    vocab = spec.arch.vocab_size
    if spec.is_diffusion:
        lk.method_for(spec)  # refuses what the estimators cannot score
    for i, (tokens, ctx) in enumerate(zip(request.sequences, request.context_lens)):
        chained = request.is_chained(i)
        bad = next((t for t in tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"sequence {i}: token id {bad} is outside the vocabulary [0, {vocab})")
        if len(tokens) > max_model_len:
            raise ValueError(f"sequence {i}: {len(tokens)} tokens exceed this model's maximum context "
                             f"length of {max_model_len}")
        need = lk.row_tokens(spec, len(tokens), ctx, block, chained)
        if need > budget:
            raise ValueError(f"sequence {i}: scoring its {len(tokens)} tokens takes {need} tokens in one "
                             f"forward, over the engine's --max-tokens-per-step of {budget}")


class ScoringJob:
    def __init__(self, request: ScoreRequest, model, spec: ModelSpec, *, samples: int, seed: int,
                 budget: int, block: int, device: torch.device) -> None:
        self.model, self.spec, self.budget, self.block, self.device = model, spec, budget, block, device
        self.method = lk.method_for(spec)
        self.samples = 1 if self.method == lk.EXACT else samples
        self.seed_used = seed = request.seed if request.seed is not None else seed
        self._rows: list[lk.Row] = []
        self._acc: dict[int, lk.Accumulator] = {}
        vocab = spec.arch.vocab_size
        for i, (tokens, ctx) in enumerate(zip(request.sequences, request.context_lens)):
            chained = request.is_chained(i)
            samples = 1 if chained else self.samples
            self._rows += lk.rows_for(spec, i, list(tokens), ctx, samples, seed, block, chained, budget)
            self._acc[i] = lk.Accumulator(list(tokens), ctx, vocab, request.top_n, samples, device)
        self._rows.reverse()  # popped from the end, in order
        self._count = len(request.sequences)

    @property
    def done(self) -> bool:
        return not self._rows

    @torch.inference_mode()
    def advance(self) -> None:
        """Run the next forward: as many rows as fit the budget once padded (at least one)."""
        batch = [self._rows.pop()]
        width = batch[0].length
        while self._rows and max(width, self._rows[-1].length) * (len(batch) + 1) <= self.budget:
            width = max(width, self._rows[-1].length)
            batch.append(self._rows.pop())
        lk.run_rows(self.model, self.spec, batch, self._acc, self.block, self.device)

    def result(self) -> ScoreResult:
        return ScoreResult(tuple(self._acc[i].result() for i in range(self._count)), self.method, self.samples)


def score_now(request: ScoreRequest, model, spec: ModelSpec, *, samples: int, seed: int = 0,
              budget: int = 4096, block: int | None = None, device: torch.device | None = None) -> ScoreResult:
    """Score synchronously (offline use and tests): the same pieces the engine loop runs."""
    block = block or spec.block_size or 32
    device = device or next(model.parameters()).device
    job = ScoringJob(request, model, spec, samples=samples, seed=seed, budget=budget, block=block, device=device)
    while not job.done:
        job.advance()
    return job.result()


@dataclass
class _Entry:
    request: ScoreRequest
    future: asyncio.Future
    job: ScoringJob | None = None
    cancelled: bool = False  # the caller stopped waiting (set on the event loop, read by the loop thread)


class ScoringQueue:
    """Scoring jobs the engine's loop thread runs between steps, one forward per turn, first
    come first served. ``submit`` runs on the event loop; ``run_piece`` on the loop thread, which
    owns the engine; results and failures cross back through ``call_soon_threadsafe``."""

    def __init__(self, engine, loop: asyncio.AbstractEventLoop, samples: int,
                 failure: Callable[[], BaseException]) -> None:
        if samples < 1:
            raise ValueError(f"likelihood_samples must be at least 1, got {samples}")
        self._engine, self._loop, self._samples = engine, loop, samples
        self._failure = failure  # what a caller gets when its job raised (the log has the details)
        self._entries: deque[_Entry] = deque()  # appended on the event loop, popped by the loop thread

    def __len__(self) -> int:
        return len(self._entries)

    def submit(self, request: ScoreRequest) -> _Entry:
        e = self._engine
        check_score_request(request, e.spec, e.max_model_len, e.config.scheduler.max_tokens_per_step, e.block_size)
        entry = _Entry(request, self._loop.create_future())
        self._entries.append(entry)
        return entry

    def run_piece(self) -> bool:
        """One forward of the oldest job (loop thread); False when there was nothing to run.
        An exception ends that job alone: its caller gets ``failure``, the engine goes on."""
        while self._entries and self._entries[0].cancelled:
            self._entries.popleft()
        if not self._entries:
            return False
        entry = self._entries[0]
        try:
            if entry.job is None:
                e = self._engine
                entry.job = ScoringJob(entry.request, e.loaded.model, e.spec, samples=self._samples,
                                       seed=e.config.seed, budget=e.config.scheduler.max_tokens_per_step,
                                       block=e.block_size, device=e.device)
            entry.job.advance()
            if entry.job.done:
                self._entries.popleft()
                self._settle(entry.future, entry.job.result())
        except Exception as exc:
            log.exception("scoring request failed: %s: %s; ending it", type(exc).__name__, exc)
            self._entries.popleft()
            self._settle(entry.future, self._failure())
        return True

    def fail_all(self, error: BaseException) -> None:
        while self._entries:
            self._settle(self._entries.popleft().future, error)

    def _settle(self, future: asyncio.Future, outcome) -> None:
        def settle() -> None:
            if future.done():
                return
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        self._loop.call_soon_threadsafe(settle)
