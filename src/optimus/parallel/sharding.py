"""Which slice of each tensor a rank of a tensor-parallel model holds (Megatron's layout).

* column-parallel (rows of the weight, dim 0): q/k/v, gate/up (dense, shared and routed
  experts); a rank holds whole heads and a contiguous part of each intermediate dimension;
* row-parallel (dim 1): o_proj / attention.dense and down_proj; their outputs are partial
  sums, reduced once per sub-layer (``attach``);
* LLaDA2's fused ``query_key_value`` [q | k | v]: each of the three segments split by head;
* the LM head by vocabulary rows (``vocab_bounds``); embeddings, norms and routers whole.

A rank's module is built from :func:`local_spec` (heads, KV heads and intermediate sizes
divided by the group size), so the KV pages it allocates hold its heads only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from optimus.models.spec import ModelSpec

_COLUMN = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
           "gate_proj.weight", "up_proj.weight")
_ROW = ("o_proj.weight", "down_proj.weight", "attention.dense.weight")
_FUSED_QKV = ("query_key_value.weight", "query_key_value.bias")
HEAD = "lm_head.weight"


class ShardingError(ValueError):
    """The model's shape cannot be split over the requested number of ranks."""


def check_divisible(spec: ModelSpec, size: int) -> None:
    arch = spec.arch
    sizes = {"num_attention_heads": arch.num_heads, "num_key_value_heads": arch.num_kv_heads,
             "intermediate_size": arch.intermediate_size}
    if arch.moe is not None:
        sizes["moe_intermediate_size"] = arch.moe.expert_size
        if arch.moe.shared_size:
            sizes["shared expert size"] = arch.moe.shared_size
    bad = [f"{name}={value}" for name, value in sizes.items() if value % size]
    if bad:
        raise ShardingError(f"--tensor-parallel {size} does not divide the model's {', '.join(bad)}")


def local_spec(spec: ModelSpec, size: int) -> ModelSpec:
    """The spec a rank's module is built from: per-rank heads and intermediate sizes, an
    untied head (the rank's head is a slice of the vocabulary, the embedding stays whole)."""
    check_divisible(spec, size)
    arch = spec.arch
    moe = arch.moe and replace(arch.moe, expert_size=arch.moe.expert_size // size,
                               shared_size=arch.moe.shared_size // size)
    local = replace(arch, num_heads=arch.num_heads // size, num_kv_heads=arch.num_kv_heads // size,
                    intermediate_size=arch.intermediate_size // size, moe=moe, tie_embeddings=False)
    return replace(spec, arch=local)


def vocab_bounds(vocab: int, rank: int, size: int) -> tuple[int, int]:
    """Rows [lo, hi) of the LM head rank ``rank`` holds: ceil(vocab / size) each, the last
    rank fewer (so every rank's reduced values have the same shape)."""
    per = -(-vocab // size)
    lo = min(rank * per, vocab)
    return lo, min(lo + per, vocab)


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``size`` of the model ``spec`` (the full model's spec)."""

    spec: ModelSpec
    rank: int
    size: int

    @property
    def vocab_range(self) -> tuple[int, int]:
        return vocab_bounds(self.spec.arch.vocab_size, self.rank, self.size)

    def slice(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full tensor ``name`` (our parameter names)."""
        arch = self.spec.arch
        if name == HEAD:
            lo, hi = self.vocab_range
            return tensor[lo:hi]
        if name.endswith(_COLUMN):
            return self._split(tensor, 0, (tensor.shape[0],))
        if name.endswith(_ROW):
            return self._split(tensor, 1, (tensor.shape[1],))
        if name.endswith(_FUSED_QKV):
            q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
            return self._split(tensor, 0, (q, kv, kv))
        return tensor

    def _split(self, tensor: torch.Tensor, dim: int, segments: tuple[int, ...]) -> torch.Tensor:
        parts, start = [], 0
        for length in segments:
            piece = length // self.size
            parts.append(tensor.narrow(dim, start + self.rank * piece, piece))
            start += length
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim)

    def local_model(self):
        """The rank's module on the ``meta`` device (shapes only)."""
        from optimus.models.transformer import DecoderLM

        lo, hi = self.vocab_range
        with torch.device("meta"):
            model = DecoderLM(local_spec(self.spec, self.size))
            model.lm_head = nn.Linear(self.spec.arch.hidden_size, hi - lo, bias=False)
        return model

    def state(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A full state dict -> this rank's (copies, so the full tensors can be freed)."""
        if self.spec.arch.tie_embeddings and HEAD not in full:
            full = {**full, HEAD: full["model.embed_tokens.weight"]}
        return {name: self.slice(name, t).clone() for name, t in full.items()}
