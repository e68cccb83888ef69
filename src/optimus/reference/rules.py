"""Fast-dLLM's commit rules: which masked positions of a step become final.

Each rule maps ``confidence`` [B, L] (``-inf`` where nothing may commit) and ``mask_index``
[B, L] to a boolean ``transfer`` [B, L] that is a subset of ``mask_index``. ``step`` is the
index of the step within the current block (only the top-k schedule uses it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


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
        transfer = mask_index & (confidence >= self.threshold)
        best = torch.argmax(confidence, dim=1, keepdim=True)
        forced = torch.zeros_like(transfer).scatter_(1, best, True)
        return (transfer | forced) & mask_index


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
            ranked = torch.sort(confidence[row][mask_index[row]], descending=True)[0]
            _, picked = torch.topk(confidence[row], k=self._count(ranked))
            transfer[row, picked] = True
        return transfer & mask_index

    def _count(self, ranked: torch.Tensor) -> int:
        """ranked [n] descending -> how many commit. The bars are compared in the confidence's
        dtype, as a tensor-scalar comparison would."""
        n = ranked.shape[0]
        bars = torch.tensor([-1.0] + [1 - self.factor / (i + 1) for i in range(2, n + 1)],
                            dtype=ranked.dtype, device=ranked.device)
        failures = torch.nonzero(ranked < bars)
        stop = int(failures[0, 0]) if len(failures) else n - 1  # the scan's last index
        return stop + 1 if stop in (0, n - 1) else stop
