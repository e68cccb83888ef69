"""Triton MoE routing: router logits -> (combine weights, expert ids) in one launch, and the
fp32 router logits of bf16 tokens and gate weights in one more.

The torch reference is ``reference.moe_route_reference`` (the contract: ``moe_route.py``); this
kernel computes the same choice for every token in one program: scores (softmax or sigmoid), the bias shift, the group limit (a
group scores the sum of its two best entries; the ``topk_group`` best groups stay), the top-k
by repeated arg-max, and the gathered, normalised, scaled weights. At decode sizes the torch
version is a dozen small launches per layer (sort, topk, scatter, masked fill...), each costing
more than the arithmetic; here it is one.

The logits kernel reads the activations and gate weights as they are stored, widens them in
registers and multiplies on tf32 tensor cores with fp32 sums: a bf16 or fp16 value is exact in
tf32 and a product of two is exact in fp32, so its logits are LLaDA2.0's
``linear(x.float(), weight.float())`` up to the order of the sums, without the two casts (at
one row the weight's cast alone moved 3 MB a layer). (Widened rather than multiplied as bf16:
Triton's CPU interpreter, which the tests run, mis-multiplies bf16 tiles.)

Ties go to the lower index at every selection, as the reference's stable sort does, so both
pick the same experts in the same order. Experts are laid out as a [groups, experts per group]
tile (one group of every expert when there is no group limit); both sizes powers of two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(LOGITS, BIAS, WEIGHTS, IDS, LIVE_ROWS, stride_ls, stride_lt, scaling, eps,
                  GROUPS: tl.constexpr, PER_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                  TOP_K: tl.constexpr, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
                  HAS_LIVE: tl.constexpr, SPLIT: tl.constexpr):
    token = tl.program_id(0)
    g = tl.arange(0, GROUPS)
    index = g[:, None] * PER_GROUP + tl.arange(0, PER_GROUP)[None, :]  # [GROUPS, PER_GROUP]
    logits = tl.load(LOGITS + token * stride_lt + index).to(tl.float32)
    for s in tl.static_range(1, SPLIT):  # partial logits, summed in a fixed order
        logits += tl.load(LOGITS + s * stride_ls + token * stride_lt + index)
    if SOFTMAX:
        e = tl.exp(logits - tl.max(tl.max(logits, axis=1), axis=0))
        scores = e / tl.sum(tl.sum(e, axis=1), axis=0)
    else:
        scores = 1.0 / (1.0 + tl.exp(-logits))
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(BIAS + index).to(tl.float32)
    big: tl.constexpr = GROUPS * PER_GROUP
    if TOPK_GROUP < GROUPS:
        # Each group's two best entries (equal maxima count twice, as topk's values do).
        top1 = tl.max(choice, axis=1)
        first = tl.min(tl.where(choice == top1[:, None], index, big), axis=1)
        top2 = tl.max(tl.where(index == first[:, None], float("-inf"), choice), axis=1)
        group_score = top1 + top2 if PER_GROUP > 1 else top1
        keep = tl.zeros((GROUPS,), dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):  # arg-max, ties to the lower group
            left = tl.where(keep, float("-inf"), group_score)
            at = tl.min(tl.where(left == tl.max(left, axis=0), g, GROUPS), axis=0)
            keep = keep | (g == at)
        choice = tl.where(keep[:, None], choice, float("-inf"))
    slots = tl.arange(0, TOP_K)
    chosen = tl.zeros((TOP_K,), dtype=tl.int32)
    picked = tl.zeros((TOP_K,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):  # arg-max, ties to the lower expert
        best = tl.max(tl.max(choice, axis=1), axis=0)
        at = tl.min(tl.min(tl.where(choice == best, index, big), axis=1), axis=0)
        chosen = tl.where(slots == j, at, chosen)
        picked = tl.where(slots == j, tl.sum(tl.sum(tl.where(index == at, scores, 0.0), axis=1), axis=0), picked)
        choice = tl.where(index == at, float("-inf"), choice)
    if NORM:
        picked = picked / (tl.sum(picked, axis=0) + eps)
    if HAS_LIVE:  # a padding row: no expert (id E), weight 0
        padding = token >= tl.load(LIVE_ROWS)
        chosen = tl.where(padding, big, chosen)
        picked = tl.where(padding, 0.0, picked)
    tl.store(WEIGHTS + token * TOP_K + slots, picked * scaling)
    tl.store(IDS + token * TOP_K + slots, chosen.to(tl.int64))


def moe_route_triton(logits: torch.Tensor, bias: torch.Tensor | None, routing,
                     live_rows: torch.Tensor | None = None, num_warps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (or partial logits [S, T, E], summed) -> (weights [T, k] fp32, ids [T, k]
    int64) under ``routing`` (MoeRouting); rows from ``live_rows`` on get id E and weight 0
    (moe_route's doc). One warp per token: its reductions then need no shared memory."""
    parts = (logits if logits.dim() == 3 else logits[None]).contiguous()
    _, t, e = parts.shape
    groups, k = max(routing.n_group, 1), routing.top_k
    weights = torch.empty(t, k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(t, k, dtype=torch.int64, device=logits.device)
    _route_kernel[(t,)](parts, bias if bias is not None else parts, weights, ids,
                        live_rows if live_rows is not None else ids, parts.stride(0), parts.stride(1),
                        float(routing.scaling), 0.0 if routing.softmax else 1e-20,
                        GROUPS=groups, PER_GROUP=e // groups, TOPK_GROUP=min(routing.topk_group, groups) if groups > 1 else 1,
                        TOP_K=k, SOFTMAX=routing.softmax, HAS_BIAS=bias is not None,
                        NORM=routing.norm_topk and k > 1, HAS_LIVE=live_rows is not None, SPLIT=parts.shape[0],
                        num_warps=num_warps)
    return weights, ids


@triton.jit
def _logits_kernel(X, W, OUT, T, E, H, k_per_split, stride_xt, stride_we, stride_os, stride_ot,
                   BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """OUT[s, t, e] = sum of X[t, h] W[e, h] over split s's inputs h (``k_per_split`` of them), in
    fp32; one [BLOCK_T, BLOCK_E] tile of one split per program."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    split = tl.program_id(2)
    row_ok, col_ok = rows < T, cols < E
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    k_end = tl.minimum(split * k_per_split + k_per_split, H)
    for k0 in range(split * k_per_split, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        x = tl.load(X + rows[:, None].to(tl.int64) * stride_xt + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(W + cols[None, :] * stride_we + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision=PRECISION)
    out = OUT + split * stride_os + rows[:, None].to(tl.int64) * stride_ot + cols[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & col_ok[None, :])


def router_logits_triton(x: torch.Tensor, weight: torch.Tensor, block_e: int = 16, block_k: int = 128,
                         programs: int = 128) -> torch.Tensor:
    """x [T, H], weight [E, H], one dtype -> fp32 partial logits [S, T, E] whose sum over S is
    the logits (the module doc). A decode step's few rows make few tiles: the inputs are split
    in S parts (a power of two) until about ``programs`` programs read the gate together."""
    t, h = x.shape
    e = weight.shape[0]
    x, weight = x.contiguous(), weight.contiguous()
    block_t = 16 if t <= 16 else 64  # tl.dot's smallest M; taller tiles read the gate fewer times
    tiles, k_blocks, split = triton.cdiv(t, block_t) * triton.cdiv(e, block_e), triton.cdiv(h, block_k), 1
    while split * 2 <= k_blocks and tiles * split * 2 <= programs:
        split *= 2
    k_per_split = triton.cdiv(k_blocks, split) * block_k
    out = torch.empty(split, t, e, dtype=torch.float32, device=x.device)
    _logits_kernel[(triton.cdiv(t, block_t), triton.cdiv(e, block_e), split)](
        x, weight, out, t, e, h, k_per_split, x.stride(0), weight.stride(0), out.stride(0), out.stride(1),
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=4)
    return out
