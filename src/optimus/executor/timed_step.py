"""A timed synthetic step for the latency profiler: ``batch`` requests, each with ``context``
cached positions and one active chunk of ``chunk`` rows, through the real runner path
(paged attention, LM head on the chunk rows).

A dLLM's rows look like a decoding step's: each request runs the group of rows it stores (a
finished window's committed tokens) and then its window's open positions (the mask id). The
tokens do not change a dense model's cost, but they decide a mixture-of-experts step's: mask
rows route alike and read few experts, token rows up to every expert each. On the LLaDA2.0-mini
shape (H100), a profile of random tokens overstated one request's 32-row steps by 30-50%, and
one of mask rows alone understated 64 requests' steps about 3x (docs/policies.md). How many of
a request's ``r`` rows are stored: a window of C positions committing tau(C) a step stores tau(C)
rows a step on average, so ``C + tau(C) = r``; under real 8B-class commit rates (tau 1, 1.24,
1.56, 1.89, 2.27, 2.68 at C = 1 to 32: the ``real-8b`` regime) that is about ``r ** 0.28``
rows (``stored_rows``). ``random_rows`` makes every row a random token (the routing model's own
benchmark).

Each request attends to a context of its own (``context_batch``: random tokens prefilled into
its own pages before any timing). Requests sharing one context ran the same hidden states:
their mask rows all routed to the same few experts, where real requests' reach many more (a
tiny LLaDA2 with the real routing: 64 requests' ar steps reached 212 distinct experts a layer,
the same steps over one shared context 31)."""

from __future__ import annotations

import time
from typing import Callable

import torch

from optimus.executor.runner import StepBatch


def stored_rows(rows: int) -> int:
    """Of a request's ``rows`` step rows, how many store committed tokens (module doc): none of
    a single row (an open window alone), else ``round(rows ** 0.28)``, at least one."""
    return 0 if rows < 2 else max(1, round(rows ** 0.28))


def _random_tokens(n: int, vocab: int, device: torch.device, avoid_id: int | None) -> torch.Tensor:
    """[n] random token ids, none of them ``avoid_id`` (a committed token is never the mask)."""
    ids = torch.randint(0, vocab, (n,), device=device)
    if avoid_id is not None:
        ids[ids == avoid_id] = (avoid_id + 1) % vocab
    return ids


def synthetic_batch(batch: int, chunk: int, context: int, page_size: int, num_pages: int,
                    device: torch.device, vocab: int, fill_id: int | None = None,
                    stored: int | None = None) -> StepBatch:
    """``fill_id``: the window token (a dLLM's mask id) of each request's last ``chunk -
    stored`` rows (None: ``stored_rows(chunk)``), random tokens before them; None: random
    tokens in every row."""
    table = context_pages(batch, context, page_size, num_pages, device)
    t = batch * chunk
    input_ids = _random_tokens(t, vocab, device, fill_id)
    if fill_id is not None:
        stored = stored_rows(chunk) if stored is None else stored
        window = torch.arange(chunk, device=device).repeat(batch) >= stored
        input_ids[window] = fill_id
    return StepBatch(
        input_ids=input_ids,
        positions=(context + torch.arange(chunk, device=device)).repeat(batch),
        groups=torch.ones(t, dtype=torch.int32, device=device),
        slots=torch.full((t,), -1, dtype=torch.long, device=device),
        cu_q=torch.arange(0, t + 1, chunk, dtype=torch.int32, device=device),
        cache_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
        page_table=table,
        logit_rows=torch.arange(t, device=device),
        max_q_len=chunk,
    )


def context_pages(batch: int, context: int, page_size: int, num_pages: int,
                  device: torch.device) -> torch.Tensor:
    """[batch, pages a context needs] int32: each request's own pages, from page 0 on (shared
    round-robin when the cache cannot give every request its own)."""
    per_request = max(1, -(-context // page_size))
    if per_request > num_pages:
        raise ValueError(f"context {context} needs {per_request} pages; the cache has {num_pages}")
    usable = num_pages // per_request * per_request
    pages = torch.arange(batch * per_request, device=device) % usable
    return pages.view(batch, per_request).to(torch.int32)


def context_batch(batch: int, context: int, page_size: int, num_pages: int, device: torch.device,
                  vocab: int, avoid_id: int | None = None) -> StepBatch:
    """A prefill of ``context`` random tokens per request into its own pages (one attention
    group per request: the cost does not matter, only the keys and values it leaves)."""
    table = context_pages(batch, context, page_size, num_pages, device)
    ids = _random_tokens(batch * context, vocab, device, avoid_id)
    positions = torch.arange(context, device=device).repeat(batch)
    owner = torch.arange(batch, device=device).repeat_interleave(context)
    slots = table[owner, positions // page_size].long() * page_size + positions % page_size
    return StepBatch(input_ids=ids, positions=positions,
                     groups=torch.zeros(batch * context, dtype=torch.int32, device=device), slots=slots,
                     cu_q=torch.arange(0, batch * context + 1, context, dtype=torch.int32, device=device),
                     cache_lens=torch.zeros(batch, dtype=torch.int32, device=device), page_table=table,
                     logit_rows=torch.zeros(0, dtype=torch.long, device=device), max_q_len=context)


def make_step_fn(engine, context: int = 256, repeats: int = 3, random_rows: bool = False
                 ) -> Callable[[int, int], float]:
    """-> step(batch, chunk) returning the fastest of ``repeats`` forwards (seconds): on a
    shared CPU the median records other processes' load and a profile saved under load
    would mislead the elastic policy for good. A dLLM's rows are a stored group and a window
    of mask ids (module doc) unless ``random_rows`` (a causal LM's rows are random tokens
    either way)."""
    runner = engine.runner
    vocab = engine.spec.arch.vocab_size
    fill_id = None if random_rows else engine.spec.mask_id
    filled = [0]  # requests whose contexts are in the cache (pages are a prefix: the largest batch covers all)

    @torch.inference_mode()
    def step(batch: int, chunk: int, stored: int | None = None) -> float:
        """``stored``: a request's stored rows (None: ``stored_rows(chunk)``)."""
        if batch > filled[0]:
            runner.forward(context_batch(batch, context, runner.page_size, engine.allocator.num_pages,
                                         runner.device, vocab, engine.spec.mask_id))
            filled[0] = batch
        b = synthetic_batch(batch, chunk, context, runner.page_size, engine.allocator.num_pages,
                            runner.device, vocab, fill_id, stored)
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
