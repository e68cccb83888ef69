"""Triton kernel for ragged group attention over a paged KV cache (see group_attention.py).

One program per (query tile of one request, KV head). The tile packs BLOCK_Q query rows x
the GQA query heads that share the KV head into BLOCK_M = BLOCK_Q * GQA_PAD matrix rows, so
a decode step with a short chunk still fills the MMA's M dimension on GQA models and each
K/V tile is loaded once per KV head. Flash-attention online softmax (exp2, fp32 stats):
first over the request's cached pages, then over its new rows up to the last row visible
to the tile (groups are nondecreasing, so the visible new keys are a prefix of the request).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from optimus.kernels.group_attention import visible_key_end

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class TileConfig:
    block_q: int  # query rows per program (a power of two)
    block_n: int  # keys per inner iteration
    num_warps: int
    num_stages: int


def choose_config(max_q_len: int, gqa_pad: int, head_dim: int, parallel: int,
                  min_programs: int = 100) -> TileConfig:
    """Tile shape from the step's longest chunk; M = BLOCK_Q * GQA_PAD matrix rows.

    ``parallel`` = requests x KV heads. Picked from H100 sweeps
    (benchmarks/results/h100/attention_micro*.json; bf16, D=128, cache 512, prefill 1024):
    short chunks are bound by reading the cache, so the smallest MMA tile (M=16) with 64-key
    steps wins; at M 64-128, 32-key steps with 4 warps beat 64-key steps and 8 warps. When
    the grid would not fill the GPU (fewer than ``min_programs``, about 3/4 of the SMs), M
    is halved: at batch 1-8 with chunk 32 this took 23-24 us down to 15-19 us.
    """
    rows = triton.next_power_of_2(max(max_q_len, 1)) * gqa_pad
    block_m = 16 if rows <= 16 else (64 if rows <= 64 or head_dim > 128 else 128)
    while block_m > 16 and parallel * triton.cdiv(max_q_len, max(1, block_m // gqa_pad)) < min_programs:
        block_m //= 2
    block_q = max(1, block_m // gqa_pad)
    if block_m <= 32:
        return TileConfig(block_q, 64, 4, 2)
    return TileConfig(block_q, 32, 4, 3)


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
        Q, K, V, KC, VC, O, PT, CL, CU, G, KV_END,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        stride_kcp, stride_kcs, stride_kch, stride_vcp, stride_vcs, stride_vch, stride_pt,
        qk_scale, PAGE_SIZE: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GQA: tl.constexpr, GQA_PAD: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    tile, r, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
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
        n = tl.arange(0, BLOCK_N)
        for start in range(0, cache_len, BLOCK_N):
            pos = start + n
            ok = pos < cache_len
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
        for start in range(q_start, kv_end, BLOCK_N):
            j = start + n
            ok = j < kv_end
            g_k = tl.load(G + j, mask=ok, other=2147483647)
            kv_mask = ok[:, None] & d_ok[None, :]
            kt = tl.load(K + j[:, None] * stride_kt + h * stride_kh + d[None, :], mask=kv_mask, other=0.0)
            vt = tl.load(V + j[:, None] * stride_vt + h * stride_vh + d[None, :], mask=kv_mask, other=0.0)
            visible = ok[None, :] & (g_k[None, :] <= g_q[:, None])
            m_i, l_i, acc = _online_update(q, kt, vt, visible, m_i, l_i, acc, qk_scale, DOT_PRECISION)

        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(O + rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def group_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                           cache_lens: torch.Tensor, cu_q: torch.Tensor, groups: torch.Tensor,
                           scale: float | None = None, max_q_len: int | None = None,
                           key_end: torch.Tensor | None = None,
                           config: TileConfig | None = None) -> torch.Tensor:
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
    cfg = config or choose_config(max_q_len, gqa_pad, d, num_req * hkv, _min_programs(q.device))
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    cu32 = cu_q.to(torch.int32)
    kv_end = visible_key_end(cu32, groups) if key_end is None else key_end.to(torch.int32)
    grid = (triton.cdiv(max_q_len, cfg.block_q), num_req, hkv)
    _group_attention_kernel[grid](
        q, k, v, k_cache, v_cache, out, page_table, cache_lens.to(torch.int32), cu32,
        groups.to(torch.int32), kv_end,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), page_table.stride(0),
        scale * LOG2E, PAGE_SIZE=k_cache.shape[1],
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), GQA=gqa, GQA_PAD=gqa_pad,
        BLOCK_Q=cfg.block_q, BLOCK_N=cfg.block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
