"""Fast-dLLM's commit rules: which masked positions of a step become final.

Each rule maps ``confidence`` [B, L] (``-inf`` where nothing may commit) and ``mask_index``
[B, L] to a boolean ``transfer`` [B, L] that is a subset of ``mask_index``. ``step`` is the
index of the step within the current block (only the top-k schedule uses it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from optimus.decoding.rules import factor_count, threshold_mask


class CommitRule(Protocol):
    def select(self, confidence: torch.Tensor, mask_index: torch.Tensor, step: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class TopKSchedule:
    """LLaDA's fixed schedule: commit ``counts[:, step]`` most confident positions."""

    counts: torch.Tensor  # [B, steps] from get_num_transfer_tokens

    def select(self, confidence: torch.Tensor, mask_index: torch.Tensor, step: int) -> torch.Tensor:
        transfer = torch.zeros_like(mask_index)
        for row in range(confidence.shape[0]):
            _, picked = torch.topk(confidence[row], k=int(self.counts[row, step]))
            transfer[row, picked] = True
        return transfer & mask_index


@dataclass(frozen=True)
class Threshold:
    """Every masked position with confidence >= threshold, plus always the most confident one
    (``argmax``: the first index among equal maxima)."""

    threshold: float

    def select(self, confidence: torch.Tensor, mask_index: torch.Tensor, step: int) -> torch.Tensor:
        transfer = torch.zeros_like(mask_index)
        for row in range(confidence.shape[0]):
            transfer[row, mask_index[row]] = threshold_mask(confidence[row][mask_index[row]], self.threshold)
        return transfer & mask_index


@dataclass(frozen=True)
class Factor:
    """The n-th most confident masked position (n = 1, 2, ...) commits while its confidence is
    at least ``1 - factor / (n + 1)``; the first always commits.

    Published quirk kept for parity: when the first failure is the *last* candidate, the scan
    counts it anyway and every masked position commits.
    """

    factor: float

    def select(self, confidence: torch.Tensor, mask_index: torch.Tensor, step: int) -> torch.Tensor:
        transfer = torch.zeros_like(mask_index)
        for row in range(confidence.shape[0]):
            if not mask_index[row].any():
                continue
            k = factor_count(confidence[row][mask_index[row]], self.factor)
            _, picked = torch.topk(confidence[row], k=k)
            transfer[row, picked] = True
        return transfer & mask_index
