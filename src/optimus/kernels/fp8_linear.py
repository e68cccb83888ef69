"""Linears whose weights stay in FP8 (e4m3) in memory: y = x @ (scale * W)^T + b.

A weight is an :class:`Fp8Weight`: e4m3 values [N, K] and fp32 scales, one per output channel
[N] or one per ``block`` tile [ceil(N/bn), ceil(K/bk)] (Hugging Face's fine-grained FP8). Activations and accumulation stay in x's dtype and fp32. Backends: "torch"
(:func:`fp8_linear_reference`: dequantize to x's dtype, then F.linear; the CPU path, and the
numerics a bf16 model with FP8-rounded weights has), "triton" (CUDA, or CPU under
TRITON_INTERPRET=1: the weight read as one byte per value, the scale applied to the fp32
accumulator), "auto" (triton on CUDA when Triton imports).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from optimus.kernels.group_attention import resolve_backend

_ACTIVATIONS = (torch.float16, torch.bfloat16, torch.float32)


class Fp8Weight(NamedTuple):
    data: torch.Tensor  # [N, K] float8_e4m3fn
    scale: torch.Tensor  # fp32 [N] (data * scale[:, None]), or [ceil(N/bn), ceil(K/bk)] per block
    block: tuple[int, int] | None = None  # (bn, bk) of block scales; None: per channel

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def expanded_scale(self) -> torch.Tensor:
        """[N, 1] or [N, K]: the scale of every weight."""
        if self.block is None:
            return self.scale[:, None]
        (bn, bk), (n, k) = self.block, self.data.shape
        return self.scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.data.float() * self.expanded_scale()).to(dtype)


def fp8_linear_reference(x: torch.Tensor, weight: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight.dequantize(x.dtype), bias)


def fp8_linear(x: torch.Tensor, weight: Fp8Weight, bias: torch.Tensor | None = None,
               backend: str = "auto") -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype."""
    _check(x, weight, bias)
    if resolve_backend(backend, x) == "torch" or x.dtype not in _ACTIVATIONS or x.dim() != 2:
        return fp8_linear_reference(x, weight, bias)
    from optimus.kernels._fp8_linear_triton import fp8_linear_triton

    x = x if x.stride(-1) == 1 else x.contiguous()
    return fp8_linear_triton(x, weight.data, weight.scale, bias, weight.block)


def _check(x: torch.Tensor, weight: Fp8Weight, bias: torch.Tensor | None) -> None:
    n, k = weight.data.shape
    if weight.data.dtype != torch.float8_e4m3fn or not weight.data.is_contiguous():
        raise ValueError(f"fp8_linear needs a contiguous e4m3 weight, got {weight.data.dtype}")
    want = (n,) if weight.block is None else (-(-n // weight.block[0]), -(-k // weight.block[1]))
    if weight.scale.shape != want or weight.scale.dtype != torch.float32 or not weight.scale.is_contiguous():
        raise ValueError(f"fp8_linear needs contiguous fp32 scales of shape {want} (one per "
                         f"{'output channel' if weight.block is None else f'{weight.block} block'}), got "
                         f"{tuple(weight.scale.shape)} {weight.scale.dtype}")
    if x.shape[-1] != k or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"fp8_linear shapes: x {tuple(x.shape)}, weight {(n, k)}, "
                         f"bias {None if bias is None else tuple(bias.shape)}")
