"""Typed description of a checkpoint: its architecture and its diffusion facts."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class AttentionKind(str, enum.Enum):
    FULL = "full"  # bidirectional over the whole sequence (LLaDA, Dream)
    BLOCK_CAUSAL = "block_causal"  # a block sees earlier blocks and itself (SDAR)
    CAUSAL = "causal"  # autoregressive LMs (Llama, Qwen)


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
