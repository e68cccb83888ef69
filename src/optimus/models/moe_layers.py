"""Decoder layers of the MoE families, and the choice of layer per index.

* Qwen3-MoE layout (SDAR-MoE): the dense block with its MLP replaced by a ``SparseMoE`` on the
  layers the config marks sparse (``decoder_sparse_step``, ``mlp_only_layers``).
* LLaDA2.0 (``LLaDA2MoeModelLM``): one fused ``attention.query_key_value`` projection, per-head
  RMSNorm on q and k (``query_layernorm`` / ``key_layernorm``), rotary on the first
  ``rotary_dim`` dims of each head only, ``attention.dense`` out; the first
  ``first_k_dense_replace`` layers keep a dense MLP, the rest are sparse with a shared expert.
Parameter names are the checkpoints' own, so loading renames nothing inside a layer.
"""

from __future__ import annotations

import torch
from torch import nn

from optimus.models.layers import AttentionBackend, DecoderLayer, GatedMLP, LayerOps, RMSNorm, no_reduce
from optimus.models.moe import SparseMoE
from optimus.models.spec import ArchConfig, ModelSpec

LLADA2 = "llada2_moe"  # the family whose layers are LLaDA2Layer


class MoEDecoderLayer(DecoderLayer):
    """The Llama/Qwen block with a sparse MLP (Qwen3-MoE names: ``mlp.gate``, ``mlp.experts``)."""

    def __init__(self, arch: ArchConfig, layer: int) -> None:
        super().__init__(arch, layer)
        self.mlp = SparseMoE(arch.hidden_size, arch.moe)

    def feed_forward(self, h: torch.Tensor, ops: LayerOps, backend: AttentionBackend) -> torch.Tensor:
        return self.mlp(h, ops, backend.live_rows)


class LLaDA2Attention(nn.Module):
    def __init__(self, arch: ArchConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.rope_dim = arch.rope_dim
        width = (arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim
        self.query_key_value = nn.Linear(arch.hidden_size, width, bias=arch.qkv_bias)
        self.query_layernorm = RMSNorm(arch.head_dim, arch.rms_eps) if arch.qk_norm else None
        self.key_layernorm = RMSNorm(arch.head_dim, arch.rms_eps) if arch.qk_norm else None
        self.dense = nn.Linear(arch.num_heads * arch.head_dim, arch.hidden_size, bias=False)
        self.reduce = no_reduce

    def forward(self, x: torch.Tensor, ops: LayerOps, backend: AttentionBackend) -> torch.Tensor:
        t, d = x.shape[0], self.head_dim
        qkv = ops.linear(x, self.query_key_value.weight, self.query_key_value.bias)
        qkv = qkv.view(t, self.num_heads + 2 * self.num_kv_heads, d)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        if self.query_layernorm is not None:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        r = self.rope_dim  # rotary on dims [0, r) of each head; [r, d) pass through
        q_rot, k_rot = ops.rotary(q[..., :r].contiguous(), k[..., :r].contiguous(), None, None)
        q = torch.cat([q_rot, q[..., r:]], dim=-1) if r < d else q_rot
        k = torch.cat([k_rot, k[..., r:]], dim=-1) if r < d else k_rot
        out = backend.attend(self.layer, q, k, v.contiguous())
        return self.reduce(ops.linear(out.reshape(t, self.num_heads * d), self.dense.weight, None))

    def fuse_projections(self) -> None:
        """q/k/v are one matmul already."""


class LLaDA2Layer(nn.Module):
    def __init__(self, arch: ArchConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_eps)
        self.attention = LLaDA2Attention(arch, layer)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_eps)
        moe = arch.moe
        if moe is not None and layer in moe.layers:
            shared = GatedMLP(arch.hidden_size, moe.shared_size) if moe.shared_size else None
            self.mlp: nn.Module = SparseMoE(arch.hidden_size, moe, shared)
        else:
            self.mlp = GatedMLP(arch.hidden_size, arch.intermediate_size)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, ops: LayerOps,
                backend: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual-stream form, as DecoderLayer.forward."""
        h, residual = ops.add_norm(x, residual, self.input_layernorm)
        h, residual = ops.add_norm(self.attention(h, ops, backend), residual, self.post_attention_layernorm)
        if isinstance(self.mlp, SparseMoE):
            return self.mlp(h, ops, backend.live_rows), residual
        return self.mlp(h, ops), residual

    def fuse_projections(self) -> None:
        self.mlp.fuse_projections()


def build_layer(spec: ModelSpec, layer: int) -> nn.Module:
    arch = spec.arch
    if spec.family == LLADA2:
        return LLaDA2Layer(arch, layer)
    if arch.moe is not None and layer in arch.moe.layers:
        return MoEDecoderLayer(arch, layer)
    return DecoderLayer(arch, layer)
