"""A step's plan: which rows of which requests run, and which of them are stored."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np

from optimus.core.canvases import Canvases
from optimus.core.request import Request


@dataclass(slots=True)  # one per request per step: slots make it cheaper to build and read
class RequestWork:
    """One request's rows in a step: rows ``[start, end)``, of which ``[start, store_end)``
    are written to the cache and ``[start, final_end)`` hold final tokens (the cache cursor
    moves there). ``groups`` is nondecreasing (see kernels.group_attention); None stands for
    the common decode layout, the stored rows group 0 and the rest group 1 (``row_groups``).
    The rows read cached positions ``[0, cached_keys)`` (default: ``start``, the cache before
    the step)."""

    request: Request
    start: int
    end: int
    store_end: int
    groups: list[int] | None
    window: tuple[int, int] | None  # predicted positions for a decode window; None for prefill
    final: int | None = None  # final_end when it differs from store_end (dual cache)
    visible: int | None = None  # cached_keys when it differs from start (dual cache)
    refresh: bool = False  # a block-start forward over the whole sequence (cache schemes)

    def row_groups(self) -> list[int]:
        if self.groups is not None:
            return self.groups
        return [0] * (self.store_end - self.start) + [1] * (self.end - self.store_end)

    @property
    def prompt_piece(self) -> bool:
        """Prefill rows of the prompt (a refresh recomputes the sequence but is not one)."""
        return self.window is None and not self.refresh

    @property
    def final_end(self) -> int:
        return self.store_end if self.final is None else self.final

    @property
    def cached_keys(self) -> int:
        return self.start if self.visible is None else self.visible


_REQUEST = operator.attrgetter("request")


@dataclass
class StepPlan:
    """A step's works, in order. The works never change once planned, so what several stages
    of the step read of them (their requests, the requests' canvas slots) is found once."""

    works: list[RequestWork]
    canvases: Canvases | None = None  # where its requests' canvases live (the scheduler's), if anywhere
    _requests: list[Request] | None = field(default=None, init=False, repr=False, compare=False)
    _slots: tuple[np.ndarray | None] | None = field(default=None, init=False, repr=False, compare=False)

    def requests(self) -> list[Request]:
        """Each work's request, in work order (not to be modified)."""
        if self._requests is None:
            self._requests = list(map(_REQUEST, self.works))
        return self._requests

    def slots(self) -> np.ndarray | None:
        """``Canvases.slots`` of :meth:`requests` in :attr:`canvases` (None: not every one is
        adopted there, or no canvases). Found at the first call: valid while none of the requests
        has ended (an ended request's slot may be given to another)."""
        if self._slots is None:
            held = self.canvases.slots(self.requests()) if self.canvases is not None else None
            self._slots = (held,)
        return self._slots[0]

    @property
    def carries_prompt(self) -> bool:
        return any(w.prompt_piece for w in self.works)

    @property
    def num_tokens(self) -> int:
        return sum(w.end - w.start for w in self.works)
