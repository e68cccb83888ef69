"""Typed description of a checkpoint: its architecture and its diffusion facts."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class AttentionKind(str, enum.Enum):
    FULL = "full"  # bidirectional over the whole sequence (LLaDA, Dream)
    BLOCK_CAUSAL = "block_causal"  # a block sees earlier blocks and itself (SDAR)
    CAUSAL = "causal"  # autoregressive LMs (Llama, Qwen)


@dataclass(frozen=True)
class MoEConfig:
    """A sparse MLP: a router picks ``top_k`` of ``num_experts`` gated MLPs per token.

    softmax routing (Qwen3-MoE): weights are the softmax over all experts of the chosen ones,
    renormalised when ``norm_topk``. sigmoid routing (LLaDA2.0): experts are chosen on
    sigmoid(logit) + expert_bias within the ``topk_group`` best of ``n_group`` groups; the
    combine weights are the chosen sigmoid scores (no bias), renormalised, times ``scaling``.
    """

    num_experts: int
    top_k: int
    expert_size: int  # each expert's intermediate size (moe_intermediate_size)
    layers: tuple[int, ...]  # which decoder layers are sparse; the others keep the dense MLP
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk: bool = True
    n_group: int = 1
    topk_group: int = 1
    scaling: float = 1.0
    expert_bias: bool = False
    shared_size: int = 0  # intermediate size of the always-on shared expert (0: none)
    # Expert parallelism: experts [lo, hi) of num_experts are held here, whole; the router
    # still scores all of them. None: every expert is held.
    placed: tuple[int, int] | None = None

    @property
    def held(self) -> tuple[int, int]:
        return self.placed or (0, self.num_experts)

    def __post_init__(self) -> None:
        if not 0 < self.top_k <= self.num_experts or self.expert_size <= 0:
            raise ValueError(f"MoE config: top_k={self.top_k} of num_experts={self.num_experts}, "
                             f"expert size {self.expert_size}")
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"MoE scoring {self.scoring!r} is not softmax or sigmoid")
        if self.num_experts % self.n_group or not 0 < self.topk_group <= self.n_group:
            raise ValueError(f"MoE groups: {self.num_experts} experts, n_group={self.n_group}, "
                             f"topk_group={self.topk_group}")
        if self.top_k > self.topk_group * self.num_experts // self.n_group:
            raise ValueError("MoE top_k exceeds the experts of the selected groups")


@dataclass(frozen=True)
class ArchConfig:
    """Shape of a decoder-only transformer in the Llama/Qwen family of layouts."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    max_position: int = 4096
    moe: MoEConfig | None = None  # sparse MLP layers (None: dense everywhere)
    rotary_dim: int = 0  # dims of each head that rotate (partial rotary); 0: all of head_dim

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_position"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config field {name}={getattr(self, name)} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_theta <= 0 or self.rms_eps <= 0:
            raise ValueError("rope_theta and rms_eps must be positive")
        if self.rotary_dim % 2 or not 0 <= self.rotary_dim <= self.head_dim:
            raise ValueError(f"rotary_dim={self.rotary_dim} must be even and at most head_dim={self.head_dim}")

    @property
    def rope_dim(self) -> int:
        return self.rotary_dim or self.head_dim


@dataclass(frozen=True)
class ModelSpec:
    """Everything the engine needs to know about a model besides its weights."""

    family: str
    arch: ArchConfig
    attention: AttentionKind
    logit_shift: bool  # Dream: token i is predicted from row i-1 (row 0 from itself)
    mask_id: int | None  # None for causal LMs
    eos_ids: tuple[int, ...]  # ids that end an answer (eos and end-of-turn)
    pad_id: int | None = None
    bos_id: int | None = None
    block_size: int | None = None  # trained block (SDAR); a decoding parameter elsewhere

    @property
    def is_diffusion(self) -> bool:
        return self.mask_id is not None
