"""Triton kernels for the greedy pick (see greedy.py for the contract)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from optimus.kernels.pdl import launch_options, wait_and_release

BLOCK = 1024  # logits per program per iteration
MAX_SPLITS = 64  # programs per row (a power of two: the merge reads them as one tile)
_FLOOR = tl.constexpr(-3.0e38)  # a finite "minus infinity": exp(FLOOR - FLOOR) is 1, never nan


@triton.jit
def _split_kernel(L, M_PART, I_PART, S_PART, V, stride_l, span,
                  SPLITS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Grid (rows, SPLITS): over columns [split * span, (split + 1) * span) keep, per lane,
    the running max, the first column reaching it and sum(exp(x - max)), then reduce."""
    wait_and_release(PDL)
    row, split = tl.program_id(0), tl.program_id(1)
    lanes = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], _FLOOR, tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    idx = tl.zeros([BLOCK], tl.int32)
    lo = split * span
    hi = tl.minimum(lo + span, V)
    for start in range(lo, hi, BLOCK):
        cols = start + lanes
        x = tl.load(L + row.to(tl.int64) * stride_l + cols, mask=cols < hi, other=float("-inf")).to(tl.float32)
        new_m = tl.maximum(m, x)
        s = s * tl.exp(m - new_m) + tl.exp(x - new_m)
        idx = tl.where(x > m, cols, idx)  # strictly greater: a lane keeps its first maximum
        m = new_m
    top = tl.max(m, 0)
    first = tl.min(tl.where(m == top, idx, 2147483647), 0)
    total = tl.sum(s * tl.exp(m - top), 0)
    part = row * SPLITS + split
    tl.store(M_PART + part, top)
    tl.store(I_PART + part, first)
    tl.store(S_PART + part, total)


@triton.jit
def _merge_kernel(M_PART, I_PART, S_PART, TOK, PROB, SPLITS: tl.constexpr, PDL: tl.constexpr):
    """Grid (rows,): the row's max over splits, its first column, and 1 / sum(exp(x - max))."""
    wait_and_release(PDL)
    row = tl.program_id(0)
    part = row * SPLITS + tl.arange(0, SPLITS)
    m = tl.load(M_PART + part)
    top = tl.max(m, 0)
    first = tl.min(tl.where(m == top, tl.load(I_PART + part), 2147483647), 0)
    total = tl.sum(tl.load(S_PART + part) * tl.exp(m - top), 0)
    tl.store(TOK + row, first.to(tl.int64))
    tl.store(PROB + row, 1.0 / total)


def argmax_prob_triton(logits: torch.Tensor, splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [M, V] (unit last stride) -> (tokens [M] int64, probabilities [M] fp32)."""
    rows, vocab = logits.shape
    splits = splits or max(1, min(MAX_SPLITS, triton.next_power_of_2(triton.cdiv(vocab, 2 * BLOCK))))
    span = triton.cdiv(triton.cdiv(vocab, splits), BLOCK) * BLOCK
    dev = logits.device
    m_part = torch.empty(rows * splits, dtype=torch.float32, device=dev)
    i_part = torch.empty(rows * splits, dtype=torch.int32, device=dev)
    s_part = torch.empty(rows * splits, dtype=torch.float32, device=dev)
    tokens = torch.empty(rows, dtype=torch.int64, device=dev)
    probs = torch.empty(rows, dtype=torch.float32, device=dev)
    opts = launch_options(dev)
    _split_kernel[(rows, splits)](logits, m_part, i_part, s_part, vocab, logits.stride(0), span,
                                  SPLITS=splits, BLOCK=BLOCK, num_warps=4, **opts)
    _merge_kernel[(rows,)](m_part, i_part, s_part, tokens, probs, SPLITS=splits, num_warps=1, **opts)
    return tokens, probs
