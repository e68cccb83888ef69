"""`ar` (C=1) and `fixed:C`: the same chunk size for every request at every step."""

from __future__ import annotations

from optimus.policy.base import StepFeedback, StepView, override_chunk


class FixedPolicy:
    """Chunk ``min(C, max_chunk)`` for every request (its own override first); the token
    budget is the scheduler's to keep, since a fixed policy has nothing to trade."""

    def __init__(self, chunk: int, name: str | None = None) -> None:
        if chunk < 1:
            raise ValueError(f"chunk size must be >= 1, got {chunk}")
        self.chunk = chunk
        self.name = name or ("ar" if chunk == 1 else f"fixed:{chunk}")

    def choose(self, view: StepView) -> list[int]:
        out = []
        for r in view.requests:
            pinned = override_chunk(r)
            out.append(pinned if pinned is not None else max(1, min(self.chunk, r.max_chunk)))
        return out

    def observe(self, feedback: StepFeedback) -> None:
        pass
