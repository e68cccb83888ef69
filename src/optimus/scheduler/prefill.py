"""Prompt pieces: how much of a prompt a step prefills, and the attention groups its rows read."""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from optimus.core.request import Request
from optimus.models.spec import AttentionKind


def prefill_groups(attention: AttentionKind, r: Request, start: int, end: int) -> list[int]:
    """Rows ``[start, end)`` of ``r``'s prompt as the model reads them (block-causal: by blocks;
    full attention: one bidirectional group); rows recomputed after it (after preemption) by the
    segments they were stored in (``Request.stored_ends``), each seeing itself and what came
    before, as when it was stored: exact at every chunk size."""
    if attention is AttentionKind.CAUSAL:
        return list(range(start, end))
    g = r.geometry
    block_causal = attention is AttentionKind.BLOCK_CAUSAL
    after_prompt = g.prefill_len // g.block_size + 1 if block_causal else 1  # above every prompt group
    groups = []
    for p in range(start, end):
        if p < g.prefill_len:
            groups.append(p // g.block_size if block_causal else 0)
        else:
            groups.append(after_prompt + bisect.bisect_right(r.stored_ends, p))
    return groups


def piece_len(attention: AttentionKind, prefill_chunk: int, r: Request, remaining: int, budget: int) -> int:
    """Rows of ``remaining`` to prefill now: at most ``prefill_chunk`` and the step's ``budget``;
    block-causal pieces end on block boundaries."""
    n = min(remaining, prefill_chunk, budget)
    if attention is AttentionKind.BLOCK_CAUSAL and n < remaining:
        n -= (r.cache_len + n) % r.geometry.block_size
    return max(n, 0)


def next_pieces(remaining: Iterable[int], prefill_chunk: int, budget: int) -> int:
    """Rows of the next piece of each prompt (``remaining``: rows each has left, in the order
    they would be prefilled), counted up to ``budget``."""
    rows = 0
    for left in remaining:
        if rows >= budget:
            break
        rows += min(left, prefill_chunk)
    return min(rows, budget)
