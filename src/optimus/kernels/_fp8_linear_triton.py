"""Triton kernel for FP8-weight linears (see fp8_linear.py for the contract).

One tiled kernel for every row count: each program computes a BLOCK_M x BLOCK_N tile of
Y = X @ (S * W)^T, walking K. W is read as e4m3 (one byte per weight: half the bytes of
bf16, which is the whole point at small batch where a linear is a weight stream) and
widened to X's dtype in registers, which is exact (every e4m3 value is a bf16 value); the
products accumulate in fp32 and the per-output-channel scale multiplies the accumulator
once at the end. With at most 16 rows the grid covers N alone and a deep load pipeline keeps
the weight stream busy (as the bf16 skinny kernel); with more rows, tiles are visited in
groups of GROUP_M row-tiles so neighbouring programs share W tiles in L2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from optimus.kernels.pdl import launch_options, wait_and_release


@dataclass(frozen=True)
class Fp8Config:
    block_m: int
    block_n: int
    block_k: int
    num_stages: int
    num_warps: int
    group_m: int = 8


def default_config(m: int, n: int) -> Fp8Config:
    """Weight streaming (<= 16 rows: the bf16 skinny kernel's tiles, docs/gpu.md) or a
    tensor-core tile for larger steps (not tuned on a GPU yet: see docs/gpu.md)."""
    if m <= 16:
        return Fp8Config(16, 16 if n <= 8192 else 32, 256, 4, 4)
    if m <= 64:
        return Fp8Config(64, 64, 128, 4, 4)
    return Fp8Config(128, 128, 64, 3, 8)


@triton.jit
def _fp8_linear_kernel(X, W, S, B, Y, M, N, K, stride_xm, stride_wn, stride_ym,
                       HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr, PDL: tl.constexpr):
    """Y[m, n] = S[n] * sum_k X[m, k] * W[n, k] (+ B[n]) for this program's tile."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    wait_and_release(PDL)
    x_ptrs = X + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]
    w_ptrs = W + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
        else:
            k_ok = (k0 + rk) < K
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w.to(X.dtype.element_ty)), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc *= tl.load(S + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def fp8_linear_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                      config: Fp8Config | None = None) -> torch.Tensor:
    """x [M, K] (unit last stride); weight [N, K] e4m3, contiguous; scale [N] fp32; bias [N] -> [M, N]."""
    m, k = x.shape
    n = weight.shape[0]
    cfg = config or default_config(m, n)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    block_k = min(cfg.block_k, max(16, triton.next_power_of_2(k)))
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _fp8_linear_kernel[grid](x, weight, scale, bias if bias is not None else scale, y, m, n, k,
                             x.stride(0), weight.stride(0), y.stride(0),
                             HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0,
                             PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                             BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, GROUP_M=cfg.group_m,
                             num_stages=cfg.num_stages, num_warps=cfg.num_warps, **launch_options(x.device))
    return y
