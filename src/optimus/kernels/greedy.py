"""Greedy pick over a vocabulary: the argmax token of each logit row and its softmax probability.

The torch reference is what the engine always did: softmax in fp32, then max. On a GPU at
batch 1 those are two single-row reductions over ~128k logits (about 60 us on an H100, one
block each); the Triton path splits each row over many programs in one pass (running max,
first argmax, rescaled sum of exponentials) and merges the pieces in a second tiny kernel.
The token is the same (first index on ties, as torch.max); the probability 1 / sum(exp(x -
max)) differs from the reference only by fp32 summation order.
Backends: "torch", "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "auto".
"""

from __future__ import annotations

import torch

from optimus.kernels.group_attention import resolve_backend


def argmax_prob_reference(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits.float(), dim=-1)
    conf, tokens = probs.max(dim=-1)
    return tokens, conf


def argmax_prob(logits: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """logits [M, V] -> (tokens [M] int64, probabilities [M] fp32), on the logits' device."""
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"argmax_prob wants logits [M, V] with V > 0; got {tuple(logits.shape)}")
    if resolve_backend(backend, logits) == "torch" or logits.shape[0] == 0:
        return argmax_prob_reference(logits)
    from optimus.kernels._greedy_triton import argmax_prob_triton

    return argmax_prob_triton(logits if logits.stride(-1) == 1 else logits.contiguous())
