"""Which slice of each tensor a rank of a tensor-parallel model holds (Megatron's layout).

* column-parallel (rows of the weight, dim 0): q/k/v, gate/up (dense, shared and routed
  experts); a rank holds whole heads and a contiguous part of each intermediate dimension;
* row-parallel (dim 1): o_proj / attention.dense and down_proj; their outputs are partial
  sums, reduced once per sub-layer (``attach``);
* LLaDA2's fused ``query_key_value`` [q | k | v]: each of the three segments split by head;
* the LM head by vocabulary rows (``vocab_bounds``); embeddings, norms and routers whole;
* with expert parallelism, routed experts placed instead of sliced: rank r holds experts
  [r E/N, (r+1) E/N) whole (``expert_bounds``) and drops the others; shared experts stay sliced.

A rank's module is built from :func:`local_spec` (heads, KV heads and intermediate sizes
divided by the group size, its range of experts), so the KV pages it allocates hold its heads only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from optimus.models.spec import ModelSpec

_COLUMN = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
           "gate_proj.weight", "up_proj.weight")
_ROW = ("o_proj.weight", "down_proj.weight", "attention.dense.weight")
_FUSED_QKV = ("query_key_value.weight", "query_key_value.bias")
HEAD = "lm_head.weight"
_ROUTED_EXPERT = re.compile(r"\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


class ShardingError(ValueError):
    """The model's shape cannot be split over the requested number of ranks."""


def check_divisible(spec: ModelSpec, size: int, expert_parallel: bool = False) -> None:
    arch = spec.arch
    if expert_parallel and arch.moe is None:
        raise ShardingError(f"--expert-parallel: {spec.family} is not a mixture-of-experts model")
    sizes = {"num_attention_heads": arch.num_heads, "num_key_value_heads": arch.num_kv_heads,
             "intermediate_size": arch.intermediate_size}
    if arch.moe is not None:
        if expert_parallel:
            sizes["num_experts"] = arch.moe.num_experts
        else:
            sizes["moe_intermediate_size"] = arch.moe.expert_size
        if arch.moe.shared_size:
            sizes["shared expert size"] = arch.moe.shared_size
    bad = [f"{name}={value}" for name, value in sizes.items() if value % size]
    if bad:
        raise ShardingError(f"--tensor-parallel {size} does not divide the model's {', '.join(bad)}")
    lo, hi = vocab_bounds(arch.vocab_size, size - 1, size)
    if lo == hi:  # every rank's head must hold a row: the greedy pick reduces over its slice
        raise ShardingError(f"--tensor-parallel {size} leaves the last rank no rows of the model's "
                            f"vocab_size={arch.vocab_size} (ceil(vocab / N) rows each)")


def local_spec(spec: ModelSpec, size: int, experts: tuple[int, int] | None = None) -> ModelSpec:
    """The spec a rank's module is built from: per-rank heads and intermediate sizes, an
    untied head (the rank's head is a slice of the vocabulary, the embedding stays whole).
    ``experts``: the range of whole experts it holds (expert parallelism); None: every expert,
    each sliced."""
    check_divisible(spec, size, experts is not None)
    arch = spec.arch
    moe = arch.moe and replace(arch.moe, shared_size=arch.moe.shared_size // size,
                               expert_size=arch.moe.expert_size if experts else arch.moe.expert_size // size,
                               placed=experts)
    local = replace(arch, num_heads=arch.num_heads // size, num_kv_heads=arch.num_kv_heads // size,
                    intermediate_size=arch.intermediate_size // size, moe=moe, tie_embeddings=False)
    return replace(spec, arch=local)


def vocab_bounds(vocab: int, rank: int, size: int) -> tuple[int, int]:
    """Rows [lo, hi) of the LM head rank ``rank`` holds: ceil(vocab / size) each, the last
    rank fewer (so every rank's reduced values have the same shape)."""
    per = -(-vocab // size)
    lo = min(rank * per, vocab)
    return lo, min(lo + per, vocab)


def expert_bounds(num_experts: int, rank: int, size: int) -> tuple[int, int]:
    """The experts [lo, hi) rank ``rank`` holds under expert parallelism (``size`` divides them)."""
    per = num_experts // size
    return rank * per, (rank + 1) * per


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``size`` of the model ``spec`` (the full model's spec); with
    ``expert_parallel``, its routed experts placed whole instead of sliced."""

    spec: ModelSpec
    rank: int
    size: int
    expert_parallel: bool = False

    @property
    def vocab_range(self) -> tuple[int, int]:
        return vocab_bounds(self.spec.arch.vocab_size, self.rank, self.size)

    @property
    def expert_range(self) -> tuple[int, int] | None:
        """The experts held whole (expert parallelism), else None."""
        moe = self.spec.arch.moe
        return expert_bounds(moe.num_experts, self.rank, self.size) if self.expert_parallel and moe else None

    def holds(self, name: str) -> bool:
        """Whether this rank keeps any of the full tensor ``name`` (under expert parallelism a
        routed expert outside its range is another rank's)."""
        placed = self.expert_range
        match = placed and _ROUTED_EXPERT.search(name)
        return not match or placed[0] <= int(match.group(1)) < placed[1]

    def slice(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full tensor ``name`` (our parameter names; one it holds)."""
        arch = self.spec.arch
        if self.expert_parallel and _ROUTED_EXPERT.search(name):
            return tensor
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
            model = DecoderLM(local_spec(self.spec, self.size, self.expert_range))
            model.lm_head = nn.Linear(self.spec.arch.hidden_size, hi - lo, bias=False)
        return model

    def state(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A full state dict -> this rank's (copies, so the full tensors can be freed)."""
        if self.spec.arch.tie_embeddings and HEAD not in full:
            full = {**full, HEAD: full["model.embed_tokens.weight"]}
        return {name: self.slice(name, t).clone() for name, t in full.items() if self.holds(name)}
