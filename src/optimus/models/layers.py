"""Layers shared by every family: RMSNorm, rotary embedding, gated MLP, attention block.

The elementwise work and the linears run through ``LayerOps``: ``TorchOps`` (the HF numerics)
or ``FusedOps`` (one Triton kernel per op; weight-streaming linears for steps of few rows).
Input projections can be merged into one matmul per block (``fuse_projections``) without
changing parameter names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
import torch.nn.functional as F

from optimus.kernels import fused, skinny_linear
from optimus.kernels.fp8_linear import Fp8Weight, fp8_linear, fp8_linear_reference
from optimus.models.fp8 import Fp8Linear
from optimus.models.spec import ArchConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back before the weight (the Llama/Qwen convention)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding(nn.Module):
    """Half-split rotary embedding evaluated in fp32 at explicit positions."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        # Always computed on the CPU in fp32 (as HF does), then moved: identical on every device.
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device="cpu").float() / self.head_dim
        return 1.0 / (self.theta ** exponents)

    def reset_buffers(self, device: torch.device | str) -> None:
        """Recompute the non-persistent buffer, e.g. after the module was built on ``meta``."""
        self.inv_freq = self._inv_freq().to(device)

    def _apply(self, fn, recurse: bool = True):
        # ``model.to(torch.bfloat16)`` would round inv_freq; RoPE must stay exact fp32.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and not self.inv_freq.is_meta:
            self.reset_buffers(self.inv_freq.device)
        return self

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, head_dim] in ``dtype``."""
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos/sin [T, D]."""
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


# ---------------------------------------------------------------- layer ops
# The elementwise work of a layer sits behind one small interface so the same module code runs
# either as plain torch (the HF numerics the parity tests check) or as fused kernels.

class LayerOps(Protocol):
    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None,
                 norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (norm(h), h) with h = residual + x (x itself when residual is None)."""
        ...

    def rotary(self, q: torch.Tensor, k: torch.Tensor, q_norm: RMSNorm | None,
               k_norm: RMSNorm | None) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hkv, D] -> rotated (q, k), after the per-head norms if any."""
        ...

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor: ...

    def linear(self, x: torch.Tensor, weight: torch.Tensor | Fp8Weight, bias: torch.Tensor | None) -> torch.Tensor:
        """x [T, K] @ weight [N, K]^T (+ bias) -> [T, N]; an FP8 weight with its scales."""
        ...


@dataclass(frozen=True)
class TorchOps:
    """Plain torch, op for op the HF Llama/Qwen code (rounding after every op)."""

    cos: torch.Tensor  # [T, D] in the activation dtype, shared by every layer of a forward
    sin: torch.Tensor

    def add_norm(self, x, residual, norm):
        h = x if residual is None else residual + x
        return norm(h), h

    def rotary(self, q, k, q_norm, k_norm):
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        return apply_rotary(q, self.cos, self.sin), apply_rotary(k, self.cos, self.sin)

    def silu_mul(self, gate, up):
        return F.silu(gate) * up

    def linear(self, x, weight, bias):
        if isinstance(weight, Fp8Weight):
            return fp8_linear_reference(x, weight, bias)
        return F.linear(x, weight, bias)


@dataclass(frozen=True)
class FusedOps:
    """One kernel per op (kernels/fused.py); rotary angles are computed in-kernel in fp32."""

    positions: torch.Tensor  # [T]
    inv_freq: torch.Tensor  # [D/2] fp32
    backend: str = "triton"

    def add_norm(self, x, residual, norm):
        return fused.rms_norm(x, norm.weight, norm.eps, residual, self.backend)

    def rotary(self, q, k, q_norm, k_norm):
        qk = None if q_norm is None else fused.QKNorm(q_norm.weight, k_norm.weight, q_norm.eps)
        return fused.rotary_qk(q, k, self.positions, self.inv_freq, qk, self.backend)

    def silu_mul(self, gate, up):
        return fused.silu_mul_split(gate, up, self.backend)

    def linear(self, x, weight, bias):
        # "auto", not self.backend: the weight-streaming kernel only pays on a GPU.
        if isinstance(weight, Fp8Weight):
            return fp8_linear(x, weight, bias, "auto")
        return skinny_linear.linear(x, weight, bias, "auto")


KERNEL_MODES = ("auto", "torch", "triton")


def layer_ops(mode: str, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding) -> LayerOps:
    """The ops for one forward. ``auto``: fused kernels for CUDA inference, torch otherwise
    (under autograd too: the kernels have no backward). ``triton`` forces the kernels (on
    CPU they need TRITON_INTERPRET=1); ``torch`` forces the reference numerics."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"unknown kernel mode {mode!r}; expected one of {KERNEL_MODES}")
    fused_ok = not torch.is_grad_enabled() and x.is_cuda and fused.triton_available()
    if mode == "triton" or (mode == "auto" and fused_ok):
        return FusedOps(positions, rotary.inv_freq)
    return TorchOps(*rotary.cos_sin(positions, x.dtype))


# ---------------------------------------------------------------- merged projections

class MergedProjections(nn.Module):
    """A block whose input Linears (named in ``MERGED``, same input) can run as one matmul.

    ``fuse_projections`` concatenates their weights (and biases) into the non-persistent
    buffers ``merged_weight``/``merged_bias`` and makes each Linear's parameter a view of
    them: names and state_dict stay as loaded and memory is not doubled. Invariant used in
    forward: the merged matmul runs only while every parameter still aliases its slice (an
    ``assign=True`` load replaces them; then the separate Linears run and the buffers go).
    """

    MERGED: tuple[str, ...] = ()

    def _init_merged(self) -> None:
        self.register_buffer("merged_weight", None, persistent=False)
        self.register_buffer("merged_bias", None, persistent=False)
        self.register_buffer("merged_scale", None, persistent=False)  # FP8 projections' scales

    def _linears(self) -> list[nn.Linear]:
        return [getattr(self, name) for name in self.MERGED]

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Idempotent: a model shared by several engines is merged once."""
        if self._merged_intact():
            return
        linears = self._linears()
        fp8 = [lin for lin in linears if isinstance(lin, Fp8Linear)]
        if fp8 and not _fp8_mergeable(linears):
            return  # each runs on its own
        self.merged_weight = _merge_param(linears, "weight")
        self.merged_bias = _merge_param(linears, "bias")
        self.merged_scale = _merge_param(linears, "weight_scale", buffer=True) if fp8 else None

    def _merged_intact(self) -> bool:
        if self.merged_weight is None:
            return False
        linears = self._linears()
        ok = all(_aliases(self.merged_weight, [lin.weight for lin in linears]))
        for merged, name in ((self.merged_bias, "bias"), (self.merged_scale, "weight_scale")):
            if merged is not None:
                ok = ok and all(_aliases(merged, [getattr(lin, name) for lin in linears]))
        if not ok:
            self.merged_weight = self.merged_bias = self.merged_scale = None
        return ok

    def _merged_operand(self) -> torch.Tensor | Fp8Weight:
        if self.merged_scale is not None:
            return Fp8Weight(self.merged_weight, self.merged_scale, self._linears()[0].block)
        return self.merged_weight

    def _project(self, x: torch.Tensor, ops: LayerOps) -> list[torch.Tensor]:
        """x [T, d] -> one [T, out_i] per merged Linear (column views when merged).

        Under autograd the separate Linears run: the merged buffer carries no gradient."""
        linears = self._linears()
        training = torch.is_grad_enabled() and linears[0].weight.requires_grad
        if training or not self._merged_intact():
            return [lin(x) for lin in linears]
        y = ops.linear(x, self._merged_operand(), self.merged_bias)
        return list(y.split([lin.out_features for lin in linears], dim=-1))

    def _apply(self, fn, recurse: bool = True):
        # A dtype/device move re-allocates each parameter on its own: alias them again.
        was_fused = self.merged_weight is not None
        super()._apply(fn, recurse)
        if was_fused and not self._merged_intact():
            self.fuse_projections()
        return self


def _merge_param(linears: list[nn.Module], name: str, buffer: bool = False) -> torch.Tensor | None:
    """Concatenate each Linear's ``name`` tensor along dim 0 and make each a view of the result."""
    parts = [getattr(lin, name) for lin in linears]
    if any(p is None for p in parts):
        return None
    if parts[0].dtype == torch.float8_e4m3fn:  # concatenated as bytes: cat of FP8 needs a recent torch
        merged = torch.cat([p.detach().view(torch.uint8) for p in parts]).view(torch.float8_e4m3fn)
    else:
        merged = torch.cat([p.detach() for p in parts])
    for lin, part, view in zip(linears, parts, merged.split([p.shape[0] for p in parts])):
        setattr(lin, name, view if buffer else nn.Parameter(view, requires_grad=part.requires_grad))
    return merged


def _fp8_mergeable(linears: list[nn.Module]) -> bool:
    """FP8 projections merge when all are FP8 with the same scale layout and block scales
    stay whole (each output size a multiple of the block's rows)."""
    if not all(isinstance(lin, Fp8Linear) for lin in linears) or len({lin.block for lin in linears}) != 1:
        return False
    block = linears[0].block
    return block is None or all(lin.out_features % block[0] == 0 for lin in linears)


def linear_operand(linear: nn.Module) -> torch.Tensor | Fp8Weight:
    """What ``ops.linear`` multiplies by for this Linear: its weight, or its FP8 weight and scales."""
    return linear.operand if isinstance(linear, Fp8Linear) else linear.weight


def _aliases(merged: torch.Tensor, parts: list[torch.Tensor]) -> list[bool]:
    """Whether each part is the slice of ``merged`` that follows the previous ones."""
    ptr, step = merged.data_ptr(), merged.element_size()
    out = []
    for p in parts:
        out.append(p.data_ptr() == ptr and p.dtype == merged.dtype)
        ptr += p.numel() * step
    return out


# ---------------------------------------------------------------- blocks

def no_reduce(x: torch.Tensor) -> torch.Tensor:
    """A sub-layer's output as is; a tensor-parallel shard sums it over ranks instead
    (``reduce``, set by parallel.attach on each layer's attention and MLP)."""
    return x


class GatedMLP(MergedProjections):
    MERGED = ("gate_proj", "up_proj")

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)
        self.reduce = no_reduce
        self._init_merged()

    def forward(self, x: torch.Tensor, ops: LayerOps) -> torch.Tensor:
        gate, up = self._project(x, ops)
        return self.reduce(ops.linear(ops.silu_mul(gate, up), linear_operand(self.down_proj), None))


class AttentionBackend(Protocol):
    """The one attention entry point. Kernels and cache layouts live behind it.

    q [T, Hq, D], k/v [T, Hkv, D] are the step's new tokens after rotary embedding;
    the backend adds whatever cached context applies and returns [T, Hq, D]. With merged
    projections v (and on the torch path q/k norms' inputs) are row-strided views.

    ``live_rows`` ([1] int32 on the step's device, or None when every row is a token): rows from
    it on are a CUDA graph's padding, owned by no request; their hidden states are garbage
    (attention never writes them), so an MoE layer must not route them to experts.
    """

    live_rows: torch.Tensor | None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class SelfAttention(MergedProjections):
    MERGED = ("q_proj", "k_proj", "v_proj")

    def __init__(self, arch: ArchConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        d = arch.hidden_size
        self.q_proj = nn.Linear(d, arch.num_heads * arch.head_dim, bias=arch.qkv_bias)
        self.k_proj = nn.Linear(d, arch.num_kv_heads * arch.head_dim, bias=arch.qkv_bias)
        self.v_proj = nn.Linear(d, arch.num_kv_heads * arch.head_dim, bias=arch.qkv_bias)
        self.o_proj = nn.Linear(arch.num_heads * arch.head_dim, d, bias=False)
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_eps)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_eps)
        else:
            self.q_norm = self.k_norm = None
        self.reduce = no_reduce
        self._init_merged()

    def forward(self, x: torch.Tensor, ops: LayerOps, backend: AttentionBackend) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self._project(x, ops)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = ops.rotary(q, k, self.q_norm, self.k_norm)
        out = backend.attend(self.layer, q, k, v)
        out = out.reshape(t, self.num_heads * self.head_dim)
        return self.reduce(ops.linear(out, linear_operand(self.o_proj), None))


class DecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_eps)
        self.self_attn = SelfAttention(arch, layer)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_eps)
        self.mlp = GatedMLP(arch.hidden_size, arch.intermediate_size)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, ops: LayerOps,
                backend: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual-stream form: x is the previous block's output not yet added to the stream
        (the embeddings, with residual None, for layer 0). Returns (this MLP's output, the
        stream before it), so each norm is one add+norm. Same sums as x + attn, x + mlp."""
        h, residual = ops.add_norm(x, residual, self.input_layernorm)
        h, residual = ops.add_norm(self.self_attn(h, ops, backend), residual, self.post_attention_layernorm)
        return self.feed_forward(h, ops, backend), residual

    def feed_forward(self, h: torch.Tensor, ops: LayerOps, backend: AttentionBackend) -> torch.Tensor:
        return self.mlp(h, ops)

    def fuse_projections(self) -> None:
        self.self_attn.fuse_projections()
        self.mlp.fuse_projections()
