"""`ar` (C=1) and `fixed:C`: the same chunk size for every request at every step."""

from __future__ import annotations

from optimus.policy.base import RequestView, StepFeedback, StepView, override_chunk


class FixedPolicy:
    """Chunk ``min(C, max_chunk)`` for every request (its own override first); the token
    budget is the scheduler's to keep, since a fixed policy has nothing to trade."""

    def __init__(self, chunk: int, name: str | None = None) -> None:
        if chunk < 1:
            raise ValueError(f"chunk size must be >= 1, got {chunk}")
        self.chunk = chunk
        self.name = name or ("ar" if chunk == 1 else f"fixed:{chunk}")

    @property
    def uniform_chunk(self) -> int:
        """Every request's chunk, clipped to its max_chunk, when none pins its own (ChunkPolicy)."""
        return self.chunk

    def choose(self, view: StepView) -> list[int]:
        c = self.chunk  # max_chunk >= 1: the minimum is a valid size
        return [min(c, r.max_chunk) if r.policy_override is None else self._pinned(r) for r in view.requests]

    def _pinned(self, r: RequestView) -> int:
        pinned = override_chunk(r)
        return pinned if pinned is not None else min(self.chunk, r.max_chunk)

    def observe(self, feedback: StepFeedback) -> None:
        pass
