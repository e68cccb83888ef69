"""A step's plan: which rows of which requests run, and which of them are stored."""

from __future__ import annotations

from dataclasses import dataclass

from optimus.core.request import Request


@dataclass
class RequestWork:
    """One request's rows in a step: rows ``[start, end)``, of which ``[start, store_end)``
    are written to the cache. ``groups`` is nondecreasing (see kernels.group_attention)."""

    request: Request
    start: int
    end: int
    store_end: int
    groups: list[int]
    window: tuple[int, int] | None  # predicted positions for a decode window; None for prefill


@dataclass
class StepPlan:
    works: list[RequestWork]

    @property
    def num_tokens(self) -> int:
        return sum(w.end - w.start for w in self.works)
