"""`ar` (C=1) and `fixed:C`: the same chunk size for every request at every step."""

from __future__ import annotations

from optimus.engine.policies.base import StepFeedback, StepView


class FixedPolicy:
    def __init__(self, chunk: int, name: str | None = None) -> None:
        self.chunk = chunk
        self.name = name or f"fixed:{chunk}"

    def choose(self, view: StepView) -> list[int]:
        return [min(self.chunk, r.max_chunk) for r in view.requests]

    def observe(self, feedback: StepFeedback) -> None:
        pass
