"""Fused MoE: the sparse MLP of a token batch given its routing.

out[t] = sum_j weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)) with e = ids[t, j], expert
weights stacked as w13 [E, 2I, H] (gate rows then up rows) and w2 [E, H, I]. An id equal to E
marks a pair whose expert lives on another rank (expert parallelism): it adds nothing. Backends: "torch"
(reference.fused_moe_reference: pairs grouped by expert, one matmul pair per touched expert;
reads expert counts on the host), "triton" (_fused_moe_triton: by the step's pairs, one GEMV per
pair, one program column per touched expert (_moe_touched_triton), or pairs sorted and padded
per expert into grouped GEMMs; SiLU fused into the gate/up pass; no host sync, so it can be
captured in a CUDA graph), "auto" (triton on CUDA when Triton imports).
"""

from __future__ import annotations

import torch

from optimus.kernels.group_attention import resolve_backend
from optimus.kernels.reference import fused_moe_reference

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H]; w2 [E, H, I]; weights [T, k]; ids [T, k] in [0, E] -> [T, H] in x's dtype."""
    _check(x, w13, w2, weights, ids)
    if resolve_backend(backend, x) == "torch" or x.dtype not in _DTYPES or torch.is_grad_enabled():
        return fused_moe_reference(x, w13, w2, weights, ids)
    from optimus.kernels._fused_moe_triton import fused_moe_triton

    return fused_moe_triton(x.contiguous(), w13.contiguous(), w2.contiguous(), weights, ids)


def _check(x, w13, w2, weights, ids) -> None:
    e, two_i, h = w13.shape
    if x.dim() != 2 or x.shape[1] != h or w2.shape != (e, h, two_i // 2) or two_i % 2:
        raise ValueError(f"fused_moe shapes: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    if ids.shape != weights.shape or ids.shape[0] != x.shape[0]:
        raise ValueError(f"fused_moe routing shapes: ids {tuple(ids.shape)}, weights {tuple(weights.shape)}")
