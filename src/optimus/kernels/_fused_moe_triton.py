"""Triton fused MoE (see fused_moe.py for the contract).

Plan of one call, all on the device with static shapes (no host sync, CUDA-graph safe):

1. ``align``: the T*k token-expert pairs are sorted by expert and each expert's run is padded
   to a multiple of BLOCK_M, into ``sorted_pairs`` [P] (P = T*k + E*(BLOCK_M-1), the most
   any routing can need; padding rows hold the sentinel T*k) and ``block_expert`` [P/BLOCK_M]
   (-1 for blocks past the used length and for the pairs of id E, whose expert is another
   rank's: their programs exit at once).
2. ``_gate_up_kernel``: per (row block, column block of I) one expert's gate and up tiles
   are accumulated together in fp32 over H and silu(gate) * up is stored: ``act`` [P, I].
3. ``_down_kernel``: per (row block, column block of H) act @ w2[e]^T, times the pair's
   routing weight, stored at the pair's own row of ``pair_out`` [T*k, H] (fp32).
4. The top-k combine is a sum over each token's k rows (a fixed order, no atomics).

Decode steps route few pairs (T*k up to ``PAIRS_MAX``): there the sort, padding and early-exit
programs above cost more than the weights they read (0.09 ms for 8 experts at one row on an H200,
0.55 TB/s). ``fused_moe_pairs`` skips them: one GEMV program per (pair, column block) reads its
expert id straight from ``ids``, and the down pass sums each token's k experts in the program
that owns its output columns. A pair re-reads an expert another pair of the step also chose;
while pairs are few, that is rarer than the padding the grouped path would run. The
touched-experts path (``_moe_touched_triton``) reads each expert once for all its rows without
the grouped path's padding and torch sort; measured faster than both at every decode size, it
takes every step up to ``TOUCHED_MAX`` pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from optimus.kernels._moe_touched_triton import PAIRS_LIMIT, fused_moe_touched


@dataclass(frozen=True)
class MoeTiles:
    block_m: int = 16  # rows of one expert per program (the smallest tl.dot M)
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


def align(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] in [0, E] -> (sorted_pairs [P] int32, block_expert [P / block_m] int32); see the
    module doc. Id E (no expert here) is sorted as one more expert whose blocks are -1."""
    flat = ids.reshape(-1).long()
    pairs = flat.numel()
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount would read its max on the host
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    start = (counts.cumsum(0) - counts)[flat]  # first sorted index of each pair's expert
    order = torch.argsort(flat, stable=True)
    sorted_expert = flat[order]
    rank = torch.arange(pairs, device=ids.device) - start[order]
    dest = (padded_end - padded)[sorted_expert] + rank
    total = pairs + (num_experts + 1) * (block_m - 1)
    total = (total + block_m - 1) // block_m * block_m
    sorted_pairs = torch.full((total,), pairs, dtype=torch.int32, device=ids.device)
    sorted_pairs[dest] = order.to(torch.int32)
    block_start = torch.arange(0, total, block_m, device=ids.device)
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_pairs, block_expert


@triton.jit
def _gate_up_kernel(X, W13, ACT, PAIRS, BLOCK_EXPERT, num_pairs, H, I, top_k,
                    stride_xt, stride_we, stride_wn, stride_at,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(BLOCK_EXPERT + pid_m)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(PAIRS + rows)
    valid = pair < num_pairs
    token = tl.where(valid, pair // top_k, 0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = W13 + expert.to(tl.int64) * stride_we
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        x = tl.load(X + token[:, None].to(tl.int64) * stride_xt + ks[None, :],
                    mask=valid[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        wu = tl.load(w_base + (cols[None, :] + I) * stride_wn + ks[:, None],
                     mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc_g = tl.dot(x, wg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(x, wu, acc_u, input_precision=PRECISION)
    act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(ACT + rows[:, None].to(tl.int64) * stride_at + cols[None, :], act.to(ACT.dtype.element_ty),
             mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(ACT, W2, WEIGHTS, OUT, PAIRS, BLOCK_EXPERT, num_pairs, H, I,
                 stride_at, stride_we, stride_wn, stride_ot,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(BLOCK_EXPERT + pid_m)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(PAIRS + rows)
    valid = pair < num_pairs
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = W2 + expert.to(tl.int64) * stride_we
    for k0 in range(0, I, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < I
        a = tl.load(ACT + rows[:, None].to(tl.int64) * stride_at + ks[None, :],
                    mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    gate = tl.load(WEIGHTS + tl.where(valid, pair, 0), mask=valid, other=0.0).to(tl.float32)
    acc = acc * gate[:, None]
    tl.store(OUT + tl.where(valid, pair, 0)[:, None].to(tl.int64) * stride_ot + cols[None, :], acc,
             mask=valid[:, None] & col_ok[None, :])


# Token-expert pairs up to which fused_moe_triton takes the GEMV path (none), then the
# touched-experts path. H100, rotating routings (moe_check), the touched path was the fastest on
# every routing timed: independent rows at 1 row (8 pairs) 0.029 ms against the pair path's
# 0.046 on llada2-mini (0.037 against 0.062 on sdar-30b-a3b), at 32 rows 0.345 against 0.393
# (pairs) and 0.438 (grouped); mask-row routing, one request's 16 rows (128 pairs, 20 experts)
# 0.062 against 0.119 and 0.122. The pair path stays as the measured alternative (moe_check).
PAIRS_MAX = 0
TOUCHED_MAX = PAIRS_LIMIT


@dataclass(frozen=True)
class PairTiles:
    gate_up_n: int = 16  # expert inner columns per program (gate and up rows each)
    down_n: int = 16  # output columns per program
    block_k: int = 128
    num_warps: int = 4


@triton.jit
def _pair_gate_up_kernel(X, W13, IDS, ACT, H, I, top_k, num_experts, stride_xt, stride_we, stride_wn, stride_at,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """act[pair, cols] = silu(x_t . gate rows) * (x_t . up rows) of the pair's expert (none for
    id num_experts: another rank's expert; the down pass skips the pair)."""
    pair, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(IDS + pair).to(tl.int64)
    if expert >= num_experts:
        return
    token = pair // top_k
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    w_base = W13 + expert * stride_we
    acc_g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # reduced over K once, after the loop
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        x = tl.load(X + token * stride_xt + ks, mask=k_ok, other=0.0).to(tl.float32)
        w_ok = col_ok[:, None] & k_ok[None, :]
        wg = tl.load(w_base + cols[:, None] * stride_wn + ks[None, :], mask=w_ok, other=0.0)
        wu = tl.load(w_base + (cols[:, None] + I) * stride_wn + ks[None, :], mask=w_ok, other=0.0)
        acc_g += wg.to(tl.float32) * x[None, :]
        acc_u += wu.to(tl.float32) * x[None, :]
    g = tl.sum(acc_g, axis=1)
    act = g / (1.0 + tl.exp(-g)) * tl.sum(acc_u, axis=1)
    tl.store(ACT + pair * stride_at + cols, act.to(ACT.dtype.element_ty), mask=col_ok)


@triton.jit
def _pair_down_kernel(ACT, W2, IDS, WEIGHTS, OUT, H, I, top_k, num_experts, stride_at, stride_we, stride_wn,
                      stride_ot, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[t, cols] = sum_j weights[t, j] * (act[t*k + j] . w2[ids[t, j]] rows cols), j in order,
    over the pairs whose expert is here (id < num_experts)."""
    token, pid_n = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    out = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in range(0, top_k):
        pair = token * top_k + j
        expert = tl.load(IDS + pair).to(tl.int64)
        if expert < num_experts:
            w_base = W2 + expert * stride_we
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for k0 in range(0, I, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < I
                a = tl.load(ACT + pair * stride_at + ks, mask=k_ok, other=0.0).to(tl.float32)
                w = tl.load(w_base + cols[:, None] * stride_wn + ks[None, :],
                            mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                acc += w.to(tl.float32) * a[None, :]
            out += tl.sum(acc, axis=1) * tl.load(WEIGHTS + pair).to(tl.float32)
    tl.store(OUT + token * stride_ot + cols, out.to(OUT.dtype.element_ty), mask=col_ok)


def fused_moe_pairs(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                    ids: torch.Tensor, tiles: PairTiles = PairTiles()) -> torch.Tensor:
    """The decode path (module doc): same contract as fused_moe_triton, two launches."""
    t, k = ids.shape
    num_experts, hidden, inner = w2.shape
    flat_ids = ids.reshape(-1).contiguous()
    act = torch.empty(t * k, inner, dtype=x.dtype, device=x.device)
    out = torch.empty(t, hidden, dtype=x.dtype, device=x.device)
    _pair_gate_up_kernel[(t * k, triton.cdiv(inner, tiles.gate_up_n))](
        x, w13, flat_ids, act, hidden, inner, k, num_experts,
        x.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        BLOCK_N=tiles.gate_up_n, BLOCK_K=tiles.block_k, num_warps=tiles.num_warps)
    _pair_down_kernel[(t, triton.cdiv(hidden, tiles.down_n))](
        act, w2, flat_ids, weights.reshape(-1).contiguous(), out, hidden, inner, k, num_experts,
        act.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        BLOCK_N=tiles.down_n, BLOCK_K=tiles.block_k, num_warps=tiles.num_warps)
    return out


def fused_moe_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                     ids: torch.Tensor, tiles: MoeTiles | None = None) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I] (contiguous), weights/ids [T, k] -> [T, H] in x's dtype.
    No tiles asked for: up to PAIRS_MAX pairs the GEMV path, up to TOUCHED_MAX the touched-experts
    path, else the grouped one."""
    if tiles is None and 0 < ids.numel() <= PAIRS_MAX:
        return fused_moe_pairs(x, w13, w2, weights, ids)
    if tiles is None and ids.numel() <= TOUCHED_MAX:
        return fused_moe_touched(x, w13, w2, weights, ids)
    return fused_moe_grouped(x, w13, w2, weights, ids, tiles)


def fused_moe_grouped(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                      ids: torch.Tensor, tiles: MoeTiles | None = None) -> torch.Tensor:
    """Pairs sorted and padded per expert, grouped GEMMs (module doc, steps 1-4)."""
    t, k = ids.shape
    num_experts, hidden, inner = w2.shape
    # Decode steps give each expert a few rows: 16-row tiles waste least on padding. Prefill
    # gives each expert many: taller tiles reuse each weight tile across more rows.
    tiles = tiles or MoeTiles(block_m=16 if t * k < 32 * num_experts else 64)
    sorted_pairs, block_expert = align(ids, num_experts, tiles.block_m)
    act = torch.empty(sorted_pairs.numel(), inner, dtype=x.dtype, device=x.device)
    pair_out = torch.zeros(t * k, hidden, dtype=torch.float32, device=x.device)
    pair_w = weights.reshape(-1).float().contiguous()
    blocks = block_expert.numel()
    opts = dict(BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
                num_warps=tiles.num_warps, num_stages=tiles.num_stages,
                PRECISION="ieee" if x.dtype == torch.float32 else "tf32")  # fp32: exact fp32 products
    _gate_up_kernel[(blocks, triton.cdiv(inner, tiles.block_n))](
        x, w13, act, sorted_pairs, block_expert, t * k, hidden, inner, k,
        x.stride(0), w13.stride(0), w13.stride(1), act.stride(0), **opts)
    _down_kernel[(blocks, triton.cdiv(hidden, tiles.block_n))](
        act, w2, pair_w, pair_out, sorted_pairs, block_expert, t * k, hidden, inner,
        act.stride(0), w2.stride(0), w2.stride(1), pair_out.stride(0), **opts)
    return pair_out.view(t, k, hidden).sum(1).to(x.dtype)
