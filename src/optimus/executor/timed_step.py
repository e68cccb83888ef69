"""A timed synthetic step for the latency profiler: ``batch`` requests, each with ``context``
cached positions and one active chunk of ``chunk`` rows, through the real runner path
(paged attention, LM head on the chunk rows).

A dLLM's chunk rows hold its mask id, as a decoding window's open positions do. The tokens
do not change a dense model's cost, but they decide a mixture-of-experts step's: rows of one
token route alike and read few experts, rows of random tokens up to every expert (on the
LLaDA2.0-mini shape, a random-token profile overstated decoding steps by 30-50%:
docs/policies.md). ``random_rows`` keeps random tokens (the routing model's own benchmark)."""

from __future__ import annotations

import time
from typing import Callable

import torch

from optimus.executor.runner import StepBatch


def synthetic_batch(batch: int, chunk: int, context: int, page_size: int, num_pages: int,
                    device: torch.device, vocab: int, fill_id: int | None = None) -> StepBatch:
    """``fill_id``: the token of every chunk row (None: random tokens)."""
    pages_per_req = max(1, -(-context // page_size))
    if pages_per_req > num_pages:
        raise ValueError(f"context {context} needs {pages_per_req} pages; the cache has {num_pages}")
    t = batch * chunk
    table = torch.arange(pages_per_req, dtype=torch.int32, device=device).repeat(batch, 1)  # shared, read-only
    return StepBatch(
        input_ids=(torch.randint(0, vocab, (t,), device=device) if fill_id is None
                   else torch.full((t,), fill_id, dtype=torch.long, device=device)),
        positions=(context + torch.arange(chunk, device=device)).repeat(batch),
        groups=torch.ones(t, dtype=torch.int32, device=device),
        slots=torch.full((t,), -1, dtype=torch.long, device=device),
        cu_q=torch.arange(0, t + 1, chunk, dtype=torch.int32, device=device),
        cache_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
        page_table=table,
        logit_rows=torch.arange(t, device=device),
        max_q_len=chunk,
    )


def make_step_fn(engine, context: int = 256, repeats: int = 3, random_rows: bool = False
                 ) -> Callable[[int, int], float]:
    """-> step(batch, chunk) returning the fastest of ``repeats`` forwards (seconds): on a
    shared CPU the median records other processes' load and a profile saved under load
    would mislead the elastic policy for good. Chunk rows hold the mask id of a dLLM unless
    ``random_rows`` (a causal LM's rows are random tokens either way)."""
    runner = engine.runner
    vocab = engine.spec.arch.vocab_size
    fill_id = None if random_rows else engine.spec.mask_id

    @torch.inference_mode()
    def step(batch: int, chunk: int) -> float:
        b = synthetic_batch(batch, chunk, context, runner.page_size, engine.allocator.num_pages,
                            runner.device, vocab, fill_id)
        times = []
        for _ in range(repeats):
            _sync(runner.device)
            t0 = time.perf_counter()
            hidden = runner.forward(b)  # the engine's path: CUDA graph when the step fits one
            runner.model.logits(hidden[b.logit_rows])
            _sync(runner.device)
            times.append(time.perf_counter() - t0)
        return min(times)  # the step's own cost; slower repeats measure whatever else ran

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
