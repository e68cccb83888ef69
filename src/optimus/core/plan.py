"""A step's plan: which rows of which requests run, and which of them are stored."""

from __future__ import annotations

import itertools
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
_WINDOW = operator.attrgetter("window")
# One C-level pass over the works for their scalars (properties and a nested attribute included).
_SCALARS = operator.attrgetter("start", "end", "store_end", "final_end", "cached_keys", "request.geometry.shift",
                               "refresh")
_NO_WINDOW = (0, 0)  # a work without a window predicts no position


@dataclass(frozen=True)
class WorkColumns:
    """Works' scalars as arrays [n] int64, in work order: RequestWork's ``start``, ``end``,
    ``store_end``, ``final_end`` and ``cached_keys``, its request's ``shift``, its window
    ``[lo, hi)`` ((0, 0) where ``windowed`` [n] bool is False: a work without a window) and
    ``refresh`` [n] bool. Shared by a step's stages: not to be modified."""

    start: np.ndarray
    end: np.ndarray
    store_end: np.ndarray
    final_end: np.ndarray
    cached_keys: np.ndarray
    shift: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    windowed: np.ndarray
    refresh: np.ndarray

    @classmethod
    def of(cls, works: list[RequestWork]) -> "WorkColumns":
        """Read off the works (a pass for the scalars, one for the windows)."""
        n = len(works)
        scalars = np.fromiter(itertools.chain.from_iterable(map(_SCALARS, works)), np.int64, 7 * n).reshape(n, 7).T
        windows = list(map(_WINDOW, works))
        windowed = np.ones(n, bool)
        if None in windows:
            windowed = np.fromiter(map(operator.is_not, windows, itertools.repeat(None)), bool, n)
            windows = [w or _NO_WINDOW for w in windows]
        lo_hi = np.fromiter(itertools.chain.from_iterable(windows), np.int64, 2 * n).reshape(n, 2).T
        return cls(*scalars[:6], *lo_hi, windowed, scalars[6].astype(bool))

    def __len__(self) -> int:
        return self.start.size

    def then(self, other: "WorkColumns") -> "WorkColumns":
        """These works' columns followed by ``other``'s."""
        return WorkColumns(*(np.concatenate([getattr(self, f), getattr(other, f)]) for f in self.__dataclass_fields__))


def rows_of(works: list[RequestWork], columns: WorkColumns | None = None) -> int:
    """The works' rows, from ``columns`` where those are every work's."""
    if columns is not None and len(columns) == len(works):
        return int(columns.end.sum() - columns.start.sum())
    return sum(w.end - w.start for w in works)


@dataclass
class StepPlan:
    """A step's works, in order. The works never change once planned, so what several stages
    of the step read of them (their requests, the requests' canvas slots) is found once."""

    works: list[RequestWork]
    canvases: Canvases | None = None  # where its requests' canvases live (the scheduler's), if anywhere
    # The columns of the first works, where the planner made those works from arrays (the rest
    # are read off the works when first needed).
    head_columns: WorkColumns | None = None
    head_slots: np.ndarray | None = None  # the first works' requests' canvas slots, where the planner has them
    _columns: WorkColumns | None = field(default=None, init=False, repr=False, compare=False)
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
            head = self.head_slots
            if head is not None and len(head) == len(self.works):
                held = head
            else:
                held = self.canvases.slots(self.requests()) if self.canvases is not None else None
            self._slots = (held,)
        return self._slots[0]

    def columns(self) -> WorkColumns:
        """:class:`WorkColumns` of every work (found once)."""
        if self._columns is None:
            head, works = self.head_columns, self.works
            if head is None:
                self._columns = WorkColumns.of(works)
            else:
                self._columns = head if len(head) == len(works) else head.then(WorkColumns.of(works[len(head):]))
        return self._columns

    @property
    def carries_prompt(self) -> bool:
        return any(w.prompt_piece for w in self.works)

    @property
    def num_tokens(self) -> int:
        """The step's rows, from the works' columns (found once, shared with the batch build)."""
        return rows_of(self.works, self.columns())
