"""Triton kernel for FP8-weight linears (see fp8_linear.py for the contract).

One tiled kernel for every row count: each program computes a BLOCK_M x BLOCK_N tile of
Y = X @ (S * W)^T, walking K. W is read as e4m3 (one byte per weight: half the bytes of
bf16, which is the whole point at small batch where a linear is a weight stream) and
widened to X's dtype in registers, which is exact (every e4m3 value is a bf16 value); the
products accumulate in fp32 and the per-output-channel scale multiplies the accumulator
once at the end (block scales, as FP8 checkpoints ship them: each K tile's sum is scaled as
it is added). With at most 16 rows the grid covers N alone and a deep load pipeline keeps
the weight stream busy (as the bf16 skinny kernel); with more rows, tiles are visited in
groups of GROUP_M row-tiles so neighbouring programs share W tiles in L2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from optimus.kernels._skinny_linear_triton import load_k_tiles
from optimus.kernels.pdl import launch_options, wait_and_release


@dataclass(frozen=True)
class Fp8Config:
    block_m: int
    block_n: int
    block_k: int
    num_stages: int
    num_warps: int
    group_m: int = 8


def default_config(m: int, n: int, k: int) -> Fp8Config:
    """Tiles from the H200 sweep of the 8B projections (fp8_micro --sweep, docs/gpu.md):
    weight streaming up to 16 rows (32 columns a program, 256 bytes of K a load, 512 when K is
    long), and a 128 x 128 tensor-core tile above 64 rows (within 4% of each shape's best at
    1,024 rows). Between them a guess, not swept."""
    if m <= 16:
        return Fp8Config(16, 32, 512 if k >= 8192 else 256, 3, 4)
    if m <= 64:
        return Fp8Config(64, 64, 128, 4, 4)
    return Fp8Config(128, 128, 64, 4, 8)


@triton.jit
def _fp8_linear_kernel(X, W, S, B, Y, M, N, K, stride_xm, stride_wn, stride_ym, stride_sn,
                       HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                       SCALE_BN: tl.constexpr, SCALE_BK: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr, PDL: tl.constexpr):
    """Y[m, n] = sum_k X[m, k] * W[n, k] * scale(n, k) (+ B[n]) for this program's tile.
    SCALE_BK == 0: one scale per output channel, S[n], applied once to the accumulator.
    Else one scale per [SCALE_BN, SCALE_BK] tile, S[n // SCALE_BN, k // SCALE_BK]: each
    K tile (BLOCK_K divides SCALE_BK) is summed apart and added scaled."""
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
    s_ptrs = S + (rn // SCALE_BN) * stride_sn if SCALE_BK else S + rn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x, w = load_k_tiles(x_ptrs, w_ptrs, m_ok, n_ok, k0 + rk, K, EVEN_K)
        w = tl.trans(w.to(X.dtype.element_ty))
        if SCALE_BK:
            part = tl.dot(x, w, input_precision=PRECISION)
            acc += part * tl.load(s_ptrs + k0 // SCALE_BK, mask=n_ok, other=0.0)[None, :]
        else:
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if not SCALE_BK:
        acc *= tl.load(s_ptrs, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def fp8_linear_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                      block: tuple[int, int] | None = None, config: Fp8Config | None = None) -> torch.Tensor:
    """x [M, K] (unit last stride); weight [N, K] e4m3, contiguous; scale fp32 [N] per channel, or
    [ceil(N/bn), ceil(K/bk)] contiguous per ``block`` (bn, bk); bias [N] -> [M, N]."""
    m, k = x.shape
    n = weight.shape[0]
    cfg = config or default_config(m, n, k)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    block_k = min(cfg.block_k, max(16, triton.next_power_of_2(k)))
    scale_bn, scale_bk = block or (1, 0)
    if block is not None:
        block_k = min(block_k, scale_bk)
        if scale_bk % block_k or block_k < 16:
            raise ValueError(f"FP8 block scales of {scale_bk} columns need a K tile (16 or more) dividing them")
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _fp8_linear_kernel[grid](x, weight, scale, bias if bias is not None else scale, y, m, n, k,
                             x.stride(0), weight.stride(0), y.stride(0), scale.stride(0),
                             HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0,
                             PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                             SCALE_BN=scale_bn, SCALE_BK=scale_bk,
                             BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, GROUP_M=cfg.group_m,
                             num_stages=cfg.num_stages, num_warps=cfg.num_warps, **launch_options(x.device))
    return y
