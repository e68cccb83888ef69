"""The touched-experts MoE path: one program column per expert the step routes to.

Decode steps of a dLLM route a request's mask rows alike (docs/models.md, "Mask rows route
alike"): one request's 16 rows choose about 20 experts for their 128 pairs. The pair path
(``_fused_moe_triton.fused_moe_pairs``) runs one GEMV per pair, so each touched expert is read
about six times, from L2 after the first; the grouped path reads it once but pads every
expert's run to 16 rows and sorts with a dozen torch launches. Here, for up to ``PAIRS_LIMIT``
pairs:

1. ``_align_kernel`` (one program): sorts the pairs by expert (``tl.sort`` on
   ``expert * P2 + pair``) into ``sorted_pairs`` [P2] and lists each touched expert once, as a
   slot: ``slot_expert`` [P2], ``slot_start`` [P2 + 1] (its run in ``sorted_pairs``), and
   ``num_slots`` [1]. Pairs of id E (another rank's expert) sort last and get no slot.
2. ``_gate_up_kernel``: per (slot, column block of I) the expert's gate and up tiles are read
   once for all its rows (in ``BLOCK_M`` row chunks): ``act`` [P2, I] at sorted positions.
3. ``_down_kernel``: per (slot, column block of H) act @ w2[e]^T times each pair's routing
   weight, stored at the pair's row of ``pair_out`` [T*k, H] (fp32).
4. ``_combine_kernel``: each token sums its k rows in a fixed order (no atomics), skipping
   pairs of id E, and casts to x's dtype.

Grids are sized for the most slots a step can have (min(T*k, E)); programs past ``num_slots``
exit at once. Static shapes, no host sync: CUDA-graph safe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

PAIRS_LIMIT = 1024  # the one-program sort holds every pair's key in registers


@dataclass(frozen=True)
class TouchedTiles:
    block_m: int = 16  # rows of one expert per tl.dot (its smallest M)
    gate_up_n: int = 32  # expert inner columns per program (gate and up rows each)
    down_n: int = 64  # output columns per program
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _align_kernel(IDS, SORTED, SORTED_EXPERT, SLOT_START, SLOT_EXPERT, NUM_SLOTS, num_pairs, num_experts,
                  P2: tl.constexpr):
    i = tl.arange(0, P2)
    expert = tl.load(IDS + i, mask=i < num_pairs, other=num_experts).to(tl.int32)  # past the end: no expert
    key = tl.sort(expert * P2 + i)
    expert, pair = key // P2, key % P2
    tl.store(SORTED + i, pair)
    tl.store(SORTED_EXPERT + i, expert)
    tl.debug_barrier()  # the neighbour's expert is read back from memory
    before = tl.load(SORTED_EXPERT + i - 1, mask=i > 0, other=-1)
    here = expert < num_experts
    starts = here & (expert != before)
    slot = tl.cumsum(starts.to(tl.int32), 0) - 1
    tl.store(SLOT_START + slot, i, mask=starts)
    tl.store(SLOT_EXPERT + slot, expert, mask=starts)
    num_slots = tl.sum(starts.to(tl.int32), 0)
    tl.store(SLOT_START + num_slots, tl.sum(here.to(tl.int32), 0))  # the last slot's end
    tl.store(NUM_SLOTS, num_slots)


@triton.jit
def _gate_up_kernel(X, W13, ACT, SORTED, SLOT_START, SLOT_EXPERT, NUM_SLOTS, H, I, top_k,
                    stride_xt, stride_we, stride_wn, stride_at,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    slot, pid_n = tl.program_id(0), tl.program_id(1)
    if slot >= tl.load(NUM_SLOTS):
        return
    expert = tl.load(SLOT_EXPERT + slot).to(tl.int64)
    start, end = tl.load(SLOT_START + slot), tl.load(SLOT_START + slot + 1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    w_base = W13 + expert * stride_we
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        valid = rows < end
        token = tl.load(SORTED + rows, mask=valid, other=0) // top_k
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < H
            x = tl.load(X + token[:, None].to(tl.int64) * stride_xt + ks[None, :],
                        mask=valid[:, None] & k_ok[None, :], other=0.0)
            w_ok = col_ok[None, :] & k_ok[:, None]
            wg = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=w_ok, other=0.0)
            wu = tl.load(w_base + (cols[None, :] + I) * stride_wn + ks[:, None], mask=w_ok, other=0.0)
            acc_g = tl.dot(x, wg, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(x, wu, acc_u, input_precision=PRECISION)
        act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        tl.store(ACT + rows[:, None].to(tl.int64) * stride_at + cols[None, :], act.to(ACT.dtype.element_ty),
                 mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(ACT, W2, WEIGHTS, PAIR_OUT, SORTED, SLOT_START, SLOT_EXPERT, NUM_SLOTS, H, I,
                 stride_at, stride_we, stride_wn, stride_ot,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    slot, pid_n = tl.program_id(0), tl.program_id(1)
    if slot >= tl.load(NUM_SLOTS):
        return
    expert = tl.load(SLOT_EXPERT + slot).to(tl.int64)
    start, end = tl.load(SLOT_START + slot), tl.load(SLOT_START + slot + 1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    w_base = W2 + expert * stride_we
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        valid = rows < end
        pair = tl.load(SORTED + rows, mask=valid, other=0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < I
            a = tl.load(ACT + rows[:, None].to(tl.int64) * stride_at + ks[None, :],
                        mask=valid[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=col_ok[None, :] & k_ok[:, None],
                        other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        acc = acc * tl.load(WEIGHTS + pair, mask=valid, other=0.0).to(tl.float32)[:, None]
        tl.store(PAIR_OUT + pair[:, None].to(tl.int64) * stride_ot + cols[None, :], acc,
                 mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _combine_kernel(PAIR_OUT, IDS, OUT, H, top_k, num_experts, stride_pt, stride_ot,
                    BLOCK_N: tl.constexpr, K2: tl.constexpr):
    token, pid_n = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    j = tl.arange(0, K2)
    pair = token * top_k + j
    # All k ids and rows in one round of loads (a loop would wait on each id in turn); a pair
    # of another rank's expert was never written: it reads as zero.
    here = (j < top_k) & (tl.load(IDS + pair, mask=j < top_k, other=num_experts) < num_experts)
    rows = tl.load(PAIR_OUT + pair[:, None].to(tl.int64) * stride_pt + cols[None, :],
                   mask=here[:, None] & col_ok[None, :], other=0.0)
    tl.store(OUT + token.to(tl.int64) * stride_ot + cols, tl.sum(rows, axis=0).to(OUT.dtype.element_ty), mask=col_ok)


def fused_moe_touched(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                      ids: torch.Tensor, tiles: TouchedTiles = TouchedTiles()) -> torch.Tensor:
    """The module doc's path: same contract as ``fused_moe_triton``, up to PAIRS_LIMIT pairs."""
    t, k = ids.shape
    num_experts, hidden, inner = w2.shape
    pairs = t * k
    if pairs == 0:
        return torch.zeros(t, hidden, dtype=x.dtype, device=x.device)
    if pairs > PAIRS_LIMIT:
        raise ValueError(f"fused_moe_touched takes up to {PAIRS_LIMIT} token-expert pairs, got {pairs}")
    p2 = max(triton.next_power_of_2(pairs), 16)
    dev = x.device
    flat_ids = ids.reshape(-1).contiguous()
    # One allocation for the align kernel's five outputs (slot_start has one entry more: an end)
    index = torch.empty(4 * p2 + 2, dtype=torch.int32, device=dev)
    sorted_pairs, sorted_expert, slot_start, slot_expert, num_slots = index.split([p2, p2, p2 + 1, p2, 1])
    _align_kernel[(1,)](flat_ids, sorted_pairs, sorted_expert, slot_start, slot_expert, num_slots, pairs, num_experts,
                        P2=p2)
    most_slots = min(pairs, num_experts)
    act = torch.empty(p2, inner, dtype=x.dtype, device=dev)
    pair_out = torch.empty(pairs, hidden, dtype=torch.float32, device=dev)
    opts = dict(BLOCK_M=tiles.block_m, BLOCK_K=tiles.block_k, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
                PRECISION="ieee" if x.dtype == torch.float32 else "tf32")  # fp32: exact fp32 products
    _gate_up_kernel[(most_slots, triton.cdiv(inner, tiles.gate_up_n))](
        x, w13, act, sorted_pairs, slot_start, slot_expert, num_slots, hidden, inner, k,
        x.stride(0), w13.stride(0), w13.stride(1), act.stride(0), BLOCK_N=tiles.gate_up_n, **opts)
    _down_kernel[(most_slots, triton.cdiv(hidden, tiles.down_n))](
        act, w2, weights.reshape(-1).contiguous(), pair_out, sorted_pairs, slot_start, slot_expert, num_slots,
        hidden, inner, act.stride(0), w2.stride(0), w2.stride(1), pair_out.stride(0), BLOCK_N=tiles.down_n, **opts)
    out = torch.empty(t, hidden, dtype=x.dtype, device=dev)
    _combine_kernel[(t, triton.cdiv(hidden, 256))](pair_out, flat_ids, out, hidden, k, num_experts,
                                                    pair_out.stride(0), out.stride(0), BLOCK_N=256,
                                                    K2=triton.next_power_of_2(k))
    return out
