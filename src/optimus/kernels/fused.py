"""Fused elementwise ops of the decoder layer: one kernel launch each instead of 3-10.

  rms_norm   (x [+ residual]) -> (weight * rmsnorm(h), h)       the add+norm between blocks
  rotary_qk  q, k, positions -> rotated q, k (optional q/k RMSNorm first, Qwen3)
  silu_mul   gate_up [T, 2I] -> silu(gate) * up [T, I]

Backends: "torch" (reference.py, any device), "triton" (CUDA, or CPU under
TRITON_INTERPRET=1), "auto" (triton on CUDA when Triton imports, torch otherwise). None of
them syncs with the host, so every op can sit inside a CUDA graph. The Triton kernels have no
backward: call them without autograd (the model only picks them when grad is off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from optimus.kernels.group_attention import BACKENDS, resolve_backend as _resolve, triton_available
from optimus.kernels.reference import rms_norm_reference, rotary_qk_reference, silu_mul_reference

__all__ = ["BACKENDS", "QKNorm", "rms_norm", "rotary_qk", "silu_mul", "silu_mul_split", "triton_available"]


@dataclass(frozen=True)
class QKNorm:
    """Per-head RMSNorm weights [D] applied to q and k before rotary (Qwen3 / SDAR)."""

    q_weight: torch.Tensor
    k_weight: torch.Tensor
    eps: float


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, d], weight [d] (, residual [T, d]) -> (y [T, d], new residual [T, d]).

    With a residual, h = x + residual (rounded to the dtype) is normalised and returned as
    the new residual; without, x is normalised and returned as is.
    """
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"rms_norm wants x [T, d] and weight [d]; got {tuple(x.shape)}, {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    if _resolve(backend, x) == "torch":
        return rms_norm_reference(x, weight, eps, residual)
    from optimus.kernels._fused_triton import rms_norm_triton

    residual = None if residual is None else _unit_stride(residual)
    return rms_norm_triton(_unit_stride(x), weight.contiguous(), eps, residual)


def rotary_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
              qk_norm: QKNorm | None = None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D] (any row/head strides), positions [T] int, inv_freq [D/2]
    fp32 -> new contiguous (q, k). Angles and rotation in fp32 (half-split layout)."""
    _check_rotary(q, k, positions, inv_freq, qk_norm)
    qw, kw, eps = (None, None, 1e-6) if qk_norm is None else (qk_norm.q_weight, qk_norm.k_weight, qk_norm.eps)
    if _resolve(backend, q) == "torch":
        return rotary_qk_reference(q, k, positions, inv_freq, qw, kw, eps)
    from optimus.kernels._fused_triton import rotary_qk_triton

    return rotary_qk_triton(_unit_stride(q), _unit_stride(k), positions.contiguous(),
                            inv_freq.float().contiguous(), None if qw is None else qw.contiguous(),
                            None if kw is None else kw.contiguous(), eps)


def silu_mul(gate_up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """gate_up [T, 2I] (gate columns first, then up) -> silu(gate) * up [T, I]."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"silu_mul wants gate_up [T, 2I]; got {tuple(gate_up.shape)}")
    if _resolve(backend, gate_up) == "torch":
        return silu_mul_reference(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return silu_mul_split(gate, up, backend="triton")


def silu_mul_split(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """gate, up [T, I] (e.g. two views of one gate_up matmul) -> silu(gate) * up [T, I]."""
    if gate.dim() != 2 or gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         "must be [T, I] of one dtype")
    if _resolve(backend, gate) == "torch":
        return torch.nn.functional.silu(gate) * up
    from optimus.kernels._fused_triton import silu_mul_triton

    return silu_mul_triton(_unit_stride(gate), _unit_stride(up))


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any outer strides but need the last dimension contiguous."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_rotary(q, k, positions, inv_freq, qk_norm) -> None:
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be [T, Hq, D] and [T, Hkv, D]")
    t, _, d = q.shape
    if d % 2 or inv_freq.shape != (d // 2,):
        raise ValueError(f"inv_freq {tuple(inv_freq.shape)} must be [{d // 2}] for head dim {d} (even)")
    if positions.shape != (t,) or positions.is_floating_point():
        raise ValueError(f"positions {tuple(positions.shape)} {positions.dtype} must be [{t}] integers")
    if qk_norm is not None and (qk_norm.q_weight.shape != (d,) or qk_norm.k_weight.shape != (d,)):
        raise ValueError(f"q/k norm weights must be [{d}]")
