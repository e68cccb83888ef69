"""Triton kernel for ragged group attention over a paged KV cache (see group_attention.py).

One program per (query tile of one request, KV head[, split]). The tile packs BLOCK_Q query
rows x the GQA query heads that share the KV head into BLOCK_M = BLOCK_Q * GQA_PAD matrix
rows, so a decode step with a short chunk still fills the MMA's M dimension on GQA models and
each K/V tile is loaded once per KV head. Flash-attention online softmax (exp2, fp32 stats):
first over the request's cached pages, then over its new rows up to the last row visible
to the tile (groups are nondecreasing, so the visible new keys are a prefix of the request).

Split-KV (flash-decoding): when the grid is too small to fill the GPU (batch 1-8 decode),
each (tile, KV head) is run by NUM_SPLITS programs, each over one contiguous piece of the
cached keys; the last split also takes the new rows. Each writes fp32 partials (running max
m, sum l, unnormalised acc) to scratch and ``_combine_splits_kernel`` merges them. The number
of splits is fixed on the host (CUDA-graph safe); each split derives its key range from the
request's cache length on the device, so one captured graph serves any cache length.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from optimus.kernels.groups import visible_key_end
from optimus.kernels.pdl import launch_options, wait_and_release

LOG2E = 1.4426950408889634
MAX_SPLITS = 16
MAX_PARTIAL_ROWS = 8192  # split partials per step: 4 MiB of fp32 acc at head_dim 128


@dataclass(frozen=True)
class TileConfig:
    block_q: int  # query rows per program (a power of two)
    block_n: int  # keys per inner iteration
    num_warps: int
    num_stages: int
    num_splits: int = 1  # pieces of each program's cached key range (a power of two; 1 = no split)


def choose_config(max_q_len: int, gqa_pad: int, head_dim: int, parallel: int,
                  min_programs: int = 100, split_kv: bool = True) -> TileConfig:
    """Tile shape from the step's longest chunk; M = BLOCK_Q * GQA_PAD matrix rows.

    ``parallel`` = requests x KV heads. Picked from H100 sweeps
    (benchmarks/results/h100/attention_micro/; bf16, D=128, cache 512, prefill 1024):
    short chunks are bound by reading the cache, so the smallest MMA tile (M=16) with 64-key
    steps wins; at M 64-128, 32-key steps with 4 warps beat 64-key steps and 8 warps. Rows
    17-32 take M=32 with 128-key steps rather than half-empty M=64 tiles: LLaDA-8B chunk 32
    at batch 8 / 32 / 128 ran 34.5 / 121.6 / 448 us against 36.7 / 121.2 / 451 (SDPA 34.5 /
    127 / 525; attention_micro/history/2026-11-26_9611cdd_targeted_tile_sweep.json). When
    the grid would not fill the GPU (fewer than ``min_programs``, about 3/4 of the SMs), M
    is halved: at batch 1-8 with chunk 32 this took 23-24 us down to 15-19 us. When even
    M=16 leaves the grid too small (batch 1-8 decode), the cache is split instead
    (``_split_config``); ``split_kv=False`` gives the M=16 unsplit config there (the
    kernel before split-KV, kept for comparisons).
    """
    rows = triton.next_power_of_2(max(max_q_len, 1)) * gqa_pad
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else (64 if rows <= 64 or head_dim > 128 else 128)
    if split_kv and _programs(max_q_len, gqa_pad, parallel, 16) < min_programs:
        return _split_config(max_q_len, gqa_pad, parallel, min(max(rows, 16), block_m, 64),
                             min_programs)
    while block_m > 16 and _programs(max_q_len, gqa_pad, parallel, block_m) < min_programs:
        block_m //= 2
    return _tile(block_m, gqa_pad)


def _programs(max_q_len: int, gqa_pad: int, parallel: int, block_m: int) -> int:
    """Grid size (query tiles x requests x KV heads) with M = block_m, before splitting."""
    return parallel * triton.cdiv(max(max_q_len, 1), max(1, block_m // gqa_pad))


def _tile(block_m: int, gqa_pad: int, num_splits: int = 1) -> TileConfig:
    block_q = max(1, block_m // gqa_pad)
    if block_m == 32 and num_splits == 1:
        return TileConfig(block_q, 128, 4, 2)
    if block_m <= 32:
        return TileConfig(block_q, 64, 4, 2, num_splits)
    return TileConfig(block_q, 32, 4, 3, num_splits)


def _split_config(max_q_len: int, gqa_pad: int, parallel: int, block_m: int,
                  min_programs: int) -> TileConfig:
    """Split-KV config for a grid too small to fill the GPU even at M=16.

    M is not halved below the chunk's rows (up to 64): with splits providing the
    parallelism, each extra query tile would only reread the whole cache. In H200 sweeps
    (bf16, D=128, batch 1, chunk 32, cache 512/2048) M=64 with 8 splits ran 9.5/14.3 us
    where M=16 with 4 splits ran 11.6/23.7 (SDPA 11.7/18.6).
    """
    programs = _programs(max_q_len, gqa_pad, parallel, block_m)
    splits = choose_splits(programs, max(block_m, gqa_pad), min_programs)
    if splits == 1:  # cannot happen for a grid this small, but stay on the tuned path if so
        return _tile(16, gqa_pad)
    return _tile(block_m, gqa_pad, splits)


def choose_splits(programs: int, rows_per_program: int, min_programs: int = 100) -> int:
    """Power of two s: double while programs * s < 2 * min_programs, stopping at MAX_SPLITS
    or where the partials would pass MAX_PARTIAL_ROWS (programs * rows_per_program * s).

    ``programs`` = query tiles x requests x KV heads, all known on the host. Cache lengths
    are not (they live on the device and change between CUDA-graph replays), so this
    assumes the cache is long, the usual case when the grid is small (decode at batch 1-8).
    Twice ``min_programs`` (about 1.5 programs per SM) beat once in H200 sweeps (bf16,
    D=128, cache 512-2048): a 64-program grid ran 11.2 us with 4 splits, 12.4 with 2
    (SDPA 13.9). The partial-row cap bounds the fp32 scratch traffic, which can outweigh a
    short cache: chunk 32 with 16 splits writes 8 MiB of partials (16 splits ran slower
    than 8 at every cache length). MAX_SPLITS: a split's range is whole BLOCK_N steps, so
    a 512-key cache in 64-key steps has only 8 nonempty splits anyway.
    """
    splits = 1
    while (splits < MAX_SPLITS and programs * splits < 2 * min_programs
           and programs * rows_per_program * splits * 2 <= MAX_PARTIAL_ROWS):
        splits *= 2
    return splits


def default_config(num_req: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                   max_q_len: int, device: torch.device, split_kv: bool = True) -> TileConfig:
    """The config ``group_attention_triton`` uses when none is given (host-side only)."""
    gqa_pad = triton.next_power_of_2(num_q_heads // num_kv_heads)
    return choose_config(max_q_len, gqa_pad, head_dim, num_req * num_kv_heads,
                         _min_programs(device), split_kv)


@functools.lru_cache(maxsize=None)
def _min_programs(device: torch.device) -> int:
    """About 3/4 of the streaming multiprocessors (100 on an H100's 132); 100 off CUDA."""
    if device.type != "cuda":
        return 100
    return max(1, 3 * torch.cuda.get_device_properties(device).multi_processor_count // 4)


@triton.jit
def _online_update(q, kt, vt, s_mask, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    """One flash step: scores q @ kt^T under s_mask, fold into (m_i, l_i, acc)."""
    s = tl.dot(q, tl.trans(kt), input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(s_mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _group_attention_kernel(
        Q, K, V, KC, VC, O, PT, CL, CU, G, KV_END, M_PART, L_PART, ACC_PART,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        stride_kcp, stride_kcs, stride_kch, stride_vcp, stride_vcs, stride_vch, stride_pt,
        qk_scale, num_q_heads, PAGE_SIZE: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GQA: tl.constexpr, GQA_PAD: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
        DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    """Grid (query tiles, requests, KV heads * NUM_SPLITS), axis 2 = h * NUM_SPLITS + split.

    NUM_SPLITS == 1: normalised rows go to O. Otherwise M_PART/L_PART [T, Hq, NUM_SPLITS]
    and ACC_PART [T, Hq, NUM_SPLITS, HEAD_DIM] (contiguous fp32) get this split's partials.
    """
    wait_and_release(PDL)
    tile, r, pid2 = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    h = pid2 // NUM_SPLITS
    split = pid2 % NUM_SPLITS
    q_start = tl.load(CU + r)
    q_end = tl.load(CU + r + 1)
    row0 = q_start + tile * BLOCK_Q
    if row0 < q_end:
        BLOCK_M: tl.constexpr = BLOCK_Q * GQA_PAD
        m = tl.arange(0, BLOCK_M)
        rows = row0 + m // GQA_PAD
        sub = m % GQA_PAD
        row_ok = (rows < q_end) & (sub < GQA)
        heads = h * GQA + sub
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(Q + rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        # Finite start so fully masked (padding) rows never produce inf - inf.
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        cache_len = tl.load(CL + r)
        if NUM_SPLITS == 1:
            lo = 0
            hi = cache_len
        else:
            # Whole BLOCK_N steps per split, so only the split holding cache_len has a
            # partial step; trailing splits get an empty range when the cache is short.
            span = tl.cdiv(tl.cdiv(cache_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
            lo = tl.minimum(split * span, cache_len)
            hi = tl.minimum(lo + span, cache_len)
        n = tl.arange(0, BLOCK_N)
        for start in range(lo, hi, BLOCK_N):
            pos = start + n
            ok = pos < hi
            page = tl.load(PT + r * stride_pt + pos // PAGE_SIZE, mask=ok, other=0).to(tl.int64)
            off = pos % PAGE_SIZE
            kp = KC + page * stride_kcp + off * stride_kcs + h * stride_kch
            vp = VC + page * stride_vcp + off * stride_vcs + h * stride_vch
            kv_mask = ok[:, None] & d_ok[None, :]
            kt = tl.load(kp[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
            vt = tl.load(vp[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
            m_i, l_i, acc = _online_update(q, kt, vt, ok[None, :], m_i, l_i, acc, qk_scale,
                                           DOT_PRECISION)

        g_q = tl.load(G + rows, mask=row_ok, other=-2147483647)
        last = tl.minimum(row0 + BLOCK_Q, q_end) - 1
        kv_end = tl.load(KV_END + last)  # exclusive end of the keys any row of the tile sees
        if NUM_SPLITS > 1:
            # The new rows belong to the last split: with rounded-up spans its cached range
            # is the shortest (often empty). Other splits get the empty range q_start..q_start.
            kv_end = tl.where(split == NUM_SPLITS - 1, kv_end, q_start)
        for start in range(q_start, kv_end, BLOCK_N):
            j = start + n
            ok = j < kv_end
            g_k = tl.load(G + j, mask=ok, other=2147483647)
            kv_mask = ok[:, None] & d_ok[None, :]
            kt = tl.load(K + j[:, None] * stride_kt + h * stride_kh + d[None, :], mask=kv_mask, other=0.0)
            vt = tl.load(V + j[:, None] * stride_vt + h * stride_vh + d[None, :], mask=kv_mask, other=0.0)
            visible = ok[None, :] & (g_k[None, :] <= g_q[:, None])
            m_i, l_i, acc = _online_update(q, kt, vt, visible, m_i, l_i, acc, qk_scale, DOT_PRECISION)

        out_mask = row_ok[:, None] & d_ok[None, :]
        if NUM_SPLITS == 1:
            l_safe = tl.where(l_i > 0.0, l_i, 1.0)
            out = acc / l_safe[:, None]
            tl.store(O + rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
                     out.to(O.dtype.element_ty), mask=out_mask)
        else:
            # Every split stores, even with an empty range (m = -1e30, l = 0, acc = 0): the
            # scratch is uninitialised and the combine reads all NUM_SPLITS entries.
            part = ((rows * num_q_heads + heads) * NUM_SPLITS + split).to(tl.int64)  # [BLOCK_M]
            tl.store(M_PART + part, m_i, mask=row_ok)
            tl.store(L_PART + part, l_i, mask=row_ok)
            tl.store(ACC_PART + part[:, None] * HEAD_DIM + d[None, :], acc, mask=out_mask)


@triton.jit
def _combine_splits_kernel(M_PART, L_PART, ACC_PART, O, stride_ot, stride_oh, num_q_heads,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           NUM_SPLITS: tl.constexpr, PDL: tl.constexpr):
    """Grid (T, Hq): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s, M = max_s m_s.

    m is in log2 units (the main kernel scales scores by log2 e). Empty splits carry
    m = -1e30, l = 0, so they weigh 0 unless every split is empty; then l sums to 0 and the
    row is written as 0 rather than 0/0 (cannot happen for a real row, which sees itself).
    """
    wait_and_release(PDL)
    t, hd = tl.program_id(0), tl.program_id(1)
    part = (t * num_q_heads + hd).to(tl.int64) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    m_s = tl.load(M_PART + part)
    l_s = tl.load(L_PART + part)
    acc = tl.load(ACC_PART + part[:, None] * HEAD_DIM + d[None, :], mask=d_ok[None, :], other=0.0)
    w = tl.math.exp2(m_s - tl.max(m_s, 0))
    l_sum = tl.sum(w * l_s, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(l_sum > 0.0, l_sum, 1.0)
    tl.store(O + t * stride_ot + hd * stride_oh + d, out.to(O.dtype.element_ty), mask=d_ok)


def group_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                           cache_lens: torch.Tensor, cu_q: torch.Tensor, groups: torch.Tensor,
                           scale: float | None = None, max_q_len: int | None = None,
                           key_end: torch.Tensor | None = None,
                           config: TileConfig | None = None) -> torch.Tensor:
    """See group_attention.group_attention; ``config`` overrides ``choose_config``."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    num_req = cu_q.numel() - 1
    out = torch.empty_like(q)
    if t == 0 or num_req == 0:
        return out
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("KV caches must be contiguous in the head dimension")
    if max_q_len is None:
        max_q_len = int((cu_q[1:] - cu_q[:-1]).max())  # host sync; pass it to avoid
    gqa = hq // hkv
    gqa_pad = triton.next_power_of_2(gqa)
    cfg = config or default_config(num_req, hq, hkv, d, max_q_len, q.device)
    splits = cfg.num_splits
    if splits < 1 or splits & (splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {splits}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    cu32 = cu_q.to(torch.int32)
    kv_end = visible_key_end(cu32, groups) if key_end is None else key_end.to(torch.int32)
    block_d = max(16, triton.next_power_of_2(d))
    if splits == 1:
        parts = (out, out, out)  # unused: NUM_SPLITS == 1 stores straight to out
    else:
        # Scratch from the caching allocator (the CUDA-graph pool under capture). Every
        # entry is written by the main kernel, so no initialisation is needed.
        stats = torch.empty(2, t, hq, splits, device=q.device, dtype=torch.float32)
        parts = (stats[0], stats[1], torch.empty(t, hq, splits, d, device=q.device,
                                                 dtype=torch.float32))
    grid = (triton.cdiv(max_q_len, cfg.block_q), num_req, hkv * splits)
    _group_attention_kernel[grid](
        q, k, v, k_cache, v_cache, out, page_table, cache_lens.to(torch.int32), cu32,
        groups.to(torch.int32), kv_end, *parts,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), page_table.stride(0),
        scale * LOG2E, hq, PAGE_SIZE=k_cache.shape[1],
        HEAD_DIM=d, BLOCK_D=block_d, GQA=gqa, GQA_PAD=gqa_pad,
        BLOCK_Q=cfg.block_q, BLOCK_N=cfg.block_n, NUM_SPLITS=splits,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(q.device))
    if splits > 1:
        _combine_splits_kernel[(t, hq)](*parts, out, out.stride(0), out.stride(1), hq,
                                        HEAD_DIM=d, BLOCK_D=block_d, NUM_SPLITS=splits,
                                        num_warps=2 if splits * block_d <= 1024 else 4,
                                        **launch_options(q.device))
    return out
