"""The decoder shared by every family. Parameter names follow the HF Llama/Qwen layout;
families with other layouts (LLaDA) rename on load. Layers come from moe_layers.build_layer
(dense blocks, or the MoE families' blocks)."""

from __future__ import annotations

import torch
from torch import nn

from optimus import toggles
from optimus.kernels import skinny_linear
from optimus.kernels.greedy import argmax_prob
from optimus.models.layers import AttentionBackend, RMSNorm, RotaryEmbedding, layer_ops
from optimus.models.moe_layers import build_layer
from optimus.models.spec import ModelSpec


class _Body(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        arch = spec.arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(build_layer(spec, i) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_eps)
        self.rotary = RotaryEmbedding(arch.rope_dim, arch.rope_theta)  # partial rotary: the first rope_dim dims


class DecoderLM(nn.Module):
    """Token-flattened decoder: every call sees a ragged batch as ``T`` tokens.

    ``forward`` returns final hidden states; ``logits`` applies the LM head to the rows
    whose logits are needed, so the head never runs on positions nobody reads.
    ``kernels`` picks the elementwise ops per forward (layers.layer_ops): "auto" (fused
    Triton kernels for CUDA inference), "torch" or "triton".
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.model = _Body(spec)
        self.lm_head = nn.Linear(spec.arch.hidden_size, spec.arch.vocab_size, bias=False)
        if spec.arch.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # A tensor-parallel shard (parallel.head.ModelParallel, set by parallel.attach): rank 0
        # announces each call for the workers to replay; the head holds a vocabulary slice.
        self.parallel = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                backend: AttentionBackend) -> torch.Tensor:
        """input_ids, positions [T] -> hidden [T, d]."""
        if self.parallel is not None:
            self.parallel.announce("forward", input_ids, positions, backend)
        x = self.model.embed_tokens(input_ids)
        ops = layer_ops(toggles.active().model_kernels, x, positions, self.model.rotary)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, ops, backend)
        return ops.add_norm(x, residual, self.model.norm)[0]

    def fuse_projections(self) -> "DecoderLM":
        """Run q/k/v and gate/up as one matmul each (weights become views of one buffer per
        block; names, state_dict and memory unchanged). Call once after loading."""
        for layer in self.model.layers:
            layer.fuse_projections()
        return self

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [M, d] -> logits [M, vocab] (a shard gathers its ranks' slices)."""
        if self.parallel is None:
            return self._head(hidden)
        self.parallel.announce("logits", hidden)
        return self.parallel.logits(self._head(hidden))

    def greedy(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [M, d] -> (argmax tokens [M], their softmax probability [M] fp32)."""
        if self.parallel is not None:
            self.parallel.announce("greedy", hidden)
            return self.parallel.greedy(self._head(hidden))
        backend = toggles.active().greedy_backend
        return argmax_prob(self._head(hidden), self._head_backend if backend == "auto" else backend)

    def sample(self, hidden: torch.Tensor, draws, suppress_rows: torch.Tensor,
               suppress_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A shard only: hidden [M, d] -> ``rules.propose``'s (tokens [M], confidence [M]) with the
        (row, id) pairs suppressed, drawn on the vocabulary slices (parallel/sampling.py)."""
        self.parallel.announce("sample", hidden, draws, suppress_rows, suppress_ids)
        return self.parallel.sample(self._head(hidden), draws, suppress_rows, suppress_ids)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        # Few rows (batch-1 decoding) on a GPU: the weight-streaming kernel; else F.linear.
        return skinny_linear.linear(hidden, self.lm_head.weight, self.lm_head.bias, self._head_backend)

    @property
    def _head_backend(self) -> str:
        """The LM head's kernels: the torch reference when the model is pinned to torch ops,
        else whatever suits the device."""
        return "torch" if toggles.active().model_kernels == "torch" else "auto"
