"""What every reference decoder hands back: the final sequence and a few counters."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecodeStats:
    steps: int  # forward passes of the model (every call counts: prefill, cache refresh, store)
    tokens: int  # positions committed (diffusion) or tokens generated (AR)
    wall_time_s: float

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0

    def summary(self) -> str:
        return (f"steps={self.steps} tokens={self.tokens} tokens/step={self.tokens_per_step:.2f} "
                f"wall={self.wall_time_s:.3f}s")


@dataclass(frozen=True)
class DecodeResult:
    """``sequence`` [B, T] is what the published function returns (prompt + canvas, masks left
    where a decoder stopped early); ``generated`` drops the prompt."""

    sequence: torch.Tensor
    prompt_length: int
    stats: DecodeStats

    @property
    def generated(self) -> torch.Tensor:
        return self.sequence[:, self.prompt_length:]


class Stopwatch:
    """Wall time of a decode, synchronising the device so queued kernels are counted."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._sync()
        self.start = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def elapsed(self) -> float:
        self._sync()
        return time.perf_counter() - self.start
