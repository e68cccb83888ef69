"""Triton kernels for the decoder layer's elementwise ops (see fused.py for the contracts).

All arithmetic is fp32; values are rounded to a storage dtype exactly where the torch
reference rounds (reference.py), so the kernels differ from it only by fp32 op order.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from optimus.kernels.pdl import launch_options, wait_and_release

# 2*pi split so that n * HI is exact for |n| < 2**16 and n * MID for |n| < 2**13 (few
# mantissa bits each); LO carries the rest. Used to reduce rotary angles to [-pi, pi].
_HI = 6.28125
_MID = round((2 * math.pi - _HI) * 2**20) / 2**20
_TWO_PI_HI = tl.constexpr(_HI)
_TWO_PI_MID = tl.constexpr(_MID)
_TWO_PI_LO = tl.constexpr(2 * math.pi - _HI - _MID)
_INV_TWO_PI = tl.constexpr(1 / (2 * math.pi))


@triton.jit
def _rms_norm_kernel(X, R, W, Y, H, stride_x, stride_r, stride_y, stride_h, n_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One program per row. H is the new residual (x + r); without R, H aliases X."""
    wait_and_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    h = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        h_stored = (h + r).to(H.dtype.element_ty)  # torch rounds the residual add
        tl.store(H + row * stride_h + cols, h_stored, mask=ok)
        h = h_stored.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    normed = (h * rstd).to(H.dtype.element_ty).to(tl.float32)  # cast back before the weight
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * normed).to(Y.dtype.element_ty), mask=ok)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    t, d = x.shape
    h_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty(t, d, dtype=torch.promote_types(h_dtype, weight.dtype), device=x.device)
    h = x if residual is None else torch.empty(t, d, dtype=h_dtype, device=x.device)
    r = x if residual is None else residual
    if t == 0:
        return y, h
    block = triton.next_power_of_2(d)
    _rms_norm_kernel[(t,)](x, r, weight, y, h, x.stride(0), r.stride(0), y.stride(0), h.stride(0),
                           d, eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
                           num_warps=min(16, max(1, block // 256)), **launch_options(x.device))
    return y, h


@triton.jit
def _cos_sin(angle):
    """cos, sin of fp32 angles after reduction to [-pi, pi] (where fast hardware sin/cos are
    accurate); the reduction is exact up to |angle| ~ 5e4 and within ~1e-6 to ~4e5."""
    n = tl.floor(angle * _INV_TWO_PI + 0.5)
    r = angle - n * _TWO_PI_HI
    r = r - n * _TWO_PI_MID
    r = r - n * _TWO_PI_LO
    return tl.cos(r), tl.sin(r)


@triton.jit
def _rotate_heads(X, NW, O, t, stride_xt, stride_xh, stride_ot, stride_oh, cos, sin, j, j_ok,
                  eps, HEADS: tl.constexpr, HEADS_BLOCK: tl.constexpr, HALF: tl.constexpr,
                  HAS_NORM: tl.constexpr):
    """Rotate every head of token t: x [HEADS, 2*HALF] -> o, optionally RMS-normalised first."""
    hh = tl.arange(0, HEADS_BLOCK)
    ok = (hh < HEADS)[:, None] & j_ok[None, :]
    src = X + t * stride_xt + hh[:, None] * stride_xh + j[None, :]
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(x1 * x1 + x2 * x2, axis=1) / (2 * HALF) + eps)
        w1 = tl.load(NW + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(NW + HALF + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        dt = O.dtype.element_ty
        x1 = (w1 * (x1 * rstd[:, None]).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        x2 = (w2 * (x2 * rstd[:, None]).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    dst = O + t * stride_ot + hh[:, None] * stride_oh + j[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(O.dtype.element_ty), mask=ok)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(O.dtype.element_ty), mask=ok)


@triton.jit
def _rotary_qk_kernel(Q, K, QO, KO, P, INV, QW, KW,
                      stride_qt, stride_qh, stride_kt, stride_kh,
                      stride_qot, stride_qoh, stride_kot, stride_koh, eps,
                      HQ: tl.constexpr, HQ_BLOCK: tl.constexpr, HK: tl.constexpr,
                      HK_BLOCK: tl.constexpr, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr,
                      HAS_NORM: tl.constexpr, PDL: tl.constexpr):
    """One program per token: the angles are computed once and shared by all q and k heads."""
    wait_and_release(PDL)
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, HALF_BLOCK)
    j_ok = j < HALF
    pos = tl.load(P + t).to(tl.float32)
    inv = tl.load(INV + j, mask=j_ok, other=0.0)
    cos, sin = _cos_sin(pos * inv)  # same fp32 product as positions.float() * inv_freq
    cos, sin = cos[None, :], sin[None, :]
    _rotate_heads(Q, QW, QO, t, stride_qt, stride_qh, stride_qot, stride_qoh, cos, sin, j, j_ok,
                  eps, HQ, HQ_BLOCK, HALF, HAS_NORM)
    _rotate_heads(K, KW, KO, t, stride_kt, stride_kh, stride_kot, stride_koh, cos, sin, j, j_ok,
                  eps, HK, HK_BLOCK, HALF, HAS_NORM)


def rotary_qk_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                     q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    t, hq, d = q.shape
    hk = k.shape[1]
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(
        k.shape, dtype=k.dtype, device=k.device)
    if t == 0:
        return q_out, k_out
    has_norm = q_norm is not None
    half = d // 2
    _rotary_qk_kernel[(t,)](
        q, k, q_out, k_out, positions, inv_freq,
        q_norm if has_norm else q, k_norm if has_norm else k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), eps,
        HQ=hq, HQ_BLOCK=triton.next_power_of_2(hq), HK=hk, HK_BLOCK=triton.next_power_of_2(hk),
        HALF=half, HALF_BLOCK=triton.next_power_of_2(half), HAS_NORM=has_norm,
        num_warps=4 if hq * d >= 2048 else 2, **launch_options(q.device))
    return q_out, k_out


@triton.jit
def _silu_mul_kernel(G, U, Y, stride_g, stride_u, stride_y, n_cols, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
    """Grid (rows, column blocks). y = silu(g) * u with silu rounded first, as torch does."""
    wait_and_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=ok, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (act * u).to(Y.dtype.element_ty), mask=ok)


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    t, inner = gate.shape
    y = torch.empty(t, inner, dtype=gate.dtype, device=gate.device)
    if t == 0:
        return y
    block = min(1024, triton.next_power_of_2(inner))
    _silu_mul_kernel[(t, triton.cdiv(inner, block))](gate, up, y, gate.stride(0), up.stride(0),
                                                      y.stride(0), inner, BLOCK=block, num_warps=4,
                                                      **launch_options(gate.device))
    return y
