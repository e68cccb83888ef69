"""Triton kernel for skinny linears (see skinny_linear.py for the contract).

With at most 16 input rows a linear is a weight stream: every byte of W is read once and
used by <= 16 rows, so the kernel's only job is to keep enough loads in flight. Each program
owns BLOCK_N output columns and walks the whole K dimension (no split-K: no fp32 workspace,
no second kernel, the same sum order on every call), so the grid is N / BLOCK_N programs and
the software pipeline (num_stages) supplies the memory parallelism.

Launched with PDL (kernels/pdl.py) a program starts while the previous kernel still runs:
it prefetches the head of its weight slab into L2 (weights are never written, so this is
safe before the wait) and so overlaps the stream's ramp with the previous kernel's tail.
GATED: the input is silu(X) * X2 (the MLP's gate and up halves), formed per K tile with the
rounding of the separate silu_mul kernel, so the down projection needs no activation kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from optimus.kernels.pdl import launch_options, wait_and_release

BLOCK_M = 16  # the smallest tl.dot M; rows beyond M are masked to zero and never stored
L2_LINE = 128  # bytes per prefetch instruction


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int = 32
    block_k: int = 256
    num_stages: int = 4
    num_warps: int = 4
    prefetch_bytes: int = 0  # of W per program into L2 before the PDL wait


PREFETCH_BYTES = 32768  # per program, before the PDL wait (an A/B switch)


def default_config(n: int, k: int) -> SkinnyConfig:
    """Tiles for an [*, k] x [n, k]^T product on one GPU (H100 sweep, docs/gpu.md).

    Narrow outputs take narrow column tiles so the grid still covers the SMs."""
    return SkinnyConfig(block_n=16 if n <= 8192 else 32, prefetch_bytes=PREFETCH_BYTES)


@triton.jit
def _prefetch_l2(ptrs):
    """Ask L2 for the 128-byte line at each pointer (no registers written, no fault)."""
    tl.inline_asm_elementwise("mov.u32 $0, 0;\n\tprefetch.global.L2 [$1];", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _skinny_linear_kernel(X, X2, W, B, Y, M, N, K, stride_xm, stride_wn, stride_ym,
                          HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, GATED: tl.constexpr,
                          PRECISION: tl.constexpr, PREFETCH_LINES: tl.constexpr,
                          LINE_ELEMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Y[m, n] = sum_k X[m, k] * W[n, k] (+ B[n]) for the BLOCK_N columns of this program;
    GATED: X[m, k] is silu(X[m, k]) * X2[m, k] (X2 has X's row stride)."""
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    w_rows = W + rn[:, None].to(tl.int64) * stride_wn
    if PDL and PREFETCH_LINES > 0:  # rows clamped into W: every prefetched address is real
        rows_in = W + tl.minimum(rn, N - 1)[:, None].to(tl.int64) * stride_wn
        _prefetch_l2(rows_in + tl.arange(0, PREFETCH_LINES)[None, :] * LINE_ELEMS)
    wait_and_release(PDL)
    x_ptrs = X + rm[:, None] * stride_xm + rk[None, :]
    x2_ptrs = X2 + rm[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_rows + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x_ok = m_ok[:, None]
            w_ok = n_ok[:, None]
        else:
            k_ok = (k0 + rk) < K
            x_ok = m_ok[:, None] & k_ok[None, :]
            w_ok = n_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptrs, mask=x_ok, other=0.0)
        if GATED:  # silu rounded to the dtype first, as torch and the silu_mul kernel do
            g = x.to(tl.float32)
            act = (g / (1.0 + tl.exp(-g))).to(x.dtype).to(tl.float32)
            x = (act * tl.load(x2_ptrs, mask=x_ok, other=0.0).to(tl.float32)).to(x.dtype)
        w = tl.load(w_ptrs, mask=w_ok, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        x2_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def skinny_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         config: SkinnyConfig | None = None, up: torch.Tensor | None = None) -> torch.Tensor:
    """x [M <= 16, K] (unit last stride), weight [N, K] contiguous, bias [N] -> [M, N].

    With ``up`` (x's shape and strides) the input is silu(x) * up."""
    m, k = x.shape
    n = weight.shape[0]
    cfg = config or default_config(n, k)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    block_k = min(cfg.block_k, max(16, triton.next_power_of_2(k)))
    line_elems = L2_LINE // weight.element_size()
    # Whole lines within the first K columns, a power of two (tl.arange) or none.
    lines = min(cfg.prefetch_bytes // (cfg.block_n * L2_LINE), k // line_elems)
    lines = 0 if lines < 1 else 1 << (lines.bit_length() - 1)
    grid = (triton.cdiv(n, cfg.block_n),)
    _skinny_linear_kernel[grid](x, up if up is not None else x, weight,
                                bias if bias is not None else weight, y, m, n, k,
                                x.stride(0), weight.stride(0), y.stride(0),
                                HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0, GATED=up is not None,
                                # fp32 stays fp32 (no TF32 rounding of the inputs), like F.linear
                                PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                                PREFETCH_LINES=lines, LINE_ELEMS=line_elems, BLOCK_M=BLOCK_M,
                                BLOCK_N=cfg.block_n, BLOCK_K=block_k,
                                num_stages=cfg.num_stages, num_warps=cfg.num_warps,
                                **launch_options(x.device))
    return y
