"""Paged KV write: store a step's new K/V rows into their cache slots.

slot = page_id * page_size + offset; slot -1 = do not store this row. On CUDA a Triton
kernel does it without a host sync (boolean indexing would sync), so it can sit inside a
CUDA graph; elsewhere the torch reference runs.
"""

from __future__ import annotations

import torch

from optimus.kernels.reference import write_kv_reference


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v [T, Hkv, D]; k_cache, v_cache [num_pages, page_size, Hkv, D]; slot_mapping [T] int64."""
    _check(k, v, k_cache, v_cache, slot_mapping)
    if k.shape[0] == 0:
        return
    if k.is_cuda:
        from optimus.kernels._kv_write_triton import write_kv_triton

        write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        write_kv_reference(k, v, k_cache, v_cache, slot_mapping)


def _check(k, v, k_cache, v_cache, slot_mapping) -> None:
    if k.shape != v.shape or k.dim() != 3:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be [T, Hkv, D]")
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4 or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not match "
                         f"[num_pages, page_size, {k.shape[1]}, {k.shape[2]}]")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} must be [{k.shape[0]}]")
