"""Ragged group attention over a paged KV cache: the one attention op of the engine.

Row i of request r attends to the request's cached positions 0..cache_lens[r]-1 (read
through page_table[r]) and to the request's new rows j of this step with
groups[j] <= groups[i]: bidirectional within a group, plus all earlier groups.
  causal prefill          groups = positions
  block-causal prefill    groups = positions // block
  dLLM decode step        group 0 = finished chunk being stored now, group 1 = active chunk
cache_lens count positions stored BEFORE this step; rows stored this step are read from
k/v only. With ``cache_only`` the new rows are not keys at all: the caller wrote them to the
cache first, and each row attends to cached positions 0..cache_lens[r]-1 only (Fast-dLLM's
dual cache: a step's rows replace their own slots, then read the whole cached canvas). Backends: "torch" (reference, any device), "triton" (CUDA, or CPU under
TRITON_INTERPRET=1), "auto" (triton on CUDA, torch otherwise).
"""

from __future__ import annotations

import torch

from optimus.kernels.groups import request_start_rows, visible_key_end
from optimus.kernels.reference import group_attention_reference

BACKENDS = ("auto", "torch", "triton")


def group_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                    cache_lens: torch.Tensor, cu_q: torch.Tensor, groups: torch.Tensor,
                    scale: float | None = None, backend: str = "auto",
                    max_q_len: int | None = None, key_end: torch.Tensor | None = None,
                    cache_only: bool = False) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D], caches [P, page_size, Hkv, D], page_table [R, max_pages]
    int32, cache_lens [R] int32, cu_q [R+1] int32, groups [T] int32 -> [T, Hq, D].

    Optional per-step metadata, shared by every layer (compute it once per step):
    ``max_q_len`` (the longest request chunk) sizes the Triton grid; pass it from host-side
    metadata to avoid a device sync (required under CUDA graph capture). ``key_end`` is
    ``visible_key_end(cu_q, groups)`` (``request_start_rows(cu_q, T)`` when ``cache_only``);
    without it the Triton path recomputes it each call.
    """
    _check(q, k, v, k_cache, v_cache, page_table, cache_lens, cu_q, groups)
    choice = resolve_backend(backend, q)
    if choice == "torch":
        return group_attention_reference(q, k, v, k_cache, v_cache, page_table, cache_lens, cu_q,
                                         groups, scale, cache_only)
    from optimus.kernels._group_attention_triton import group_attention_triton

    if cache_only and key_end is None:
        key_end = request_start_rows(cu_q, q.shape[0])

    return group_attention_triton(q, k, v, k_cache, v_cache, page_table, cache_lens, cu_q, groups,
                                  scale, max_q_len, key_end)


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """'auto' -> Triton for CUDA tensors (when Triton imports), torch otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "triton" if q.is_cuda and triton_available() else "torch"
    return backend


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check(q, k, v, k_cache, v_cache, page_table, cache_lens, cu_q, groups) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"q {tuple(q.shape)} must be [T, Hq, D] and k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} both [T, Hkv, D]")
    t, hq, d = q.shape
    if k.shape[0] != t or k.shape[2] != d or hq % k.shape[1]:
        raise ValueError(f"k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} "
                         "(same T and D, Hq a multiple of Hkv)")
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4 or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"caches {tuple(k_cache.shape)} must be [P, page_size, {k.shape[1]}, {d}]")
    num_req = cu_q.numel() - 1
    if page_table.dim() != 2 or page_table.shape[0] != num_req or cache_lens.shape != (num_req,):
        raise ValueError(f"page_table {tuple(page_table.shape)} and cache_lens "
                         f"{tuple(cache_lens.shape)} must have one row per request ({num_req})")
    if groups.shape != (t,):
        raise ValueError(f"groups {tuple(groups.shape)} must be [{t}]")
