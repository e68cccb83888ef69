"""Triton kernel for skinny linears (see skinny_linear.py for the contract).

With at most 16 input rows a linear is a weight stream: every byte of W is read once and
used by <= 16 rows, so the kernel's only job is to keep enough loads in flight. Each program
owns BLOCK_N output columns and walks the whole K dimension (no split-K: no fp32 workspace,
no second kernel, the same sum order on every call), so the grid is N / BLOCK_N programs and
the software pipeline (num_stages) supplies the memory parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from optimus.kernels.pdl import launch_options, wait_and_release

BLOCK_M = 16  # the smallest tl.dot M; rows beyond M are masked to zero and never stored


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int = 32
    block_k: int = 256
    num_stages: int = 4
    num_warps: int = 4


def default_config(n: int, k: int) -> SkinnyConfig:
    """Tiles for an [*, k] x [n, k]^T product on one GPU (H100 sweep, docs/gpu.md).

    Narrow outputs take narrow column tiles so the grid still covers the SMs."""
    return SkinnyConfig(block_n=16 if n <= 8192 else 32)


@triton.jit
def load_k_tiles(x_ptrs, w_ptrs, m_ok, n_ok, k, K, EVEN_K: tl.constexpr):
    """One K tile of X [BLOCK_M, BLOCK_K] and of W [BLOCK_N, BLOCK_K] (rows past M or N and
    columns ``k`` past K read as 0; EVEN_K: K is a multiple of the tile, no column mask)."""
    if EVEN_K:
        x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
        w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
    else:
        k_ok = k < K
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
    return x, w


@triton.jit
def _skinny_linear_kernel(X, W, B, Y, M, N, K, stride_xm, stride_wn, stride_ym,
                          HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PDL: tl.constexpr):
    """Y[m, n] = sum_k X[m, k] * W[n, k] (+ B[n]) for the BLOCK_N columns of this program."""
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    wait_and_release(PDL)
    x_ptrs = X + rm[:, None] * stride_xm + rk[None, :]
    w_ptrs = W + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x, w = load_k_tiles(x_ptrs, w_ptrs, m_ok, n_ok, k0 + rk, K, EVEN_K)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def skinny_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         config: SkinnyConfig | None = None) -> torch.Tensor:
    """x [M <= 16, K] (unit last stride), weight [N, K] contiguous, bias [N] -> [M, N]."""
    m, k = x.shape
    n = weight.shape[0]
    cfg = config or default_config(n, k)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    block_k = min(cfg.block_k, max(16, triton.next_power_of_2(k)))
    grid = (triton.cdiv(n, cfg.block_n),)
    _skinny_linear_kernel[grid](x, weight, bias if bias is not None else weight, y, m, n, k,
                                x.stride(0), weight.stride(0), y.stride(0),
                                HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0,
                                # fp32 stays fp32 (no TF32 rounding of the inputs), like F.linear
                                PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_M=BLOCK_M,
                                BLOCK_N=cfg.block_n, BLOCK_K=block_k,
                                num_stages=cfg.num_stages, num_warps=cfg.num_warps, **launch_options(x.device))
    return y
