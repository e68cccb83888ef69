"""Triton kernel for the paged KV write (see kv_write.py): one program per token row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from optimus.kernels.pdl import launch_options, wait_and_release


@triton.jit
def _write_kv_kernel(K, V, KC, VC, SLOT, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_kcp, stride_kcs, stride_kch, stride_vcp, stride_vcs, stride_vch,
                     page_size, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
    wait_and_release(PDL)
    t = tl.program_id(0)
    slot = tl.load(SLOT + t).to(tl.int64)
    if slot >= 0:
        page, off = slot // page_size, slot % page_size
        i = tl.arange(0, BLOCK)  # flattened (head, dim)
        ok = i < HEADS * HEAD_DIM
        hd, dd = i // HEAD_DIM, i % HEAD_DIM
        kx = tl.load(K + t * stride_kt + hd * stride_kh + dd, mask=ok)
        vx = tl.load(V + t * stride_vt + hd * stride_vh + dd, mask=ok)
        tl.store(KC + page * stride_kcp + off * stride_kcs + hd * stride_kch + dd,
                 kx.to(KC.dtype.element_ty), mask=ok)
        tl.store(VC + page * stride_vcp + off * stride_vcs + hd * stride_vch + dd,
                 vx.to(VC.dtype.element_ty), mask=ok)


def write_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("KV caches must be contiguous in the head dimension")
    heads, dim = k.shape[1], k.shape[2]
    _write_kv_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_cache.shape[1], HEADS=heads, HEAD_DIM=dim, BLOCK=triton.next_power_of_2(heads * dim),
        num_warps=4, **launch_options(k.device))
