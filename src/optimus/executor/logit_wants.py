"""Which logit rows a step needs, and which predicted position each one serves.

A step at 256 requests has a window each, so the per-window records are built as arrays
(:class:`LogitWants`); the batched commit reads those, and only paths that go window by window
(sampled rows, constrained rows, a request ended while its step ran) get :class:`LogitRequest`
items, made on first access."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class LogitRequest(NamedTuple):  # a tuple: cheap to build and read
    """Which predicted positions of a work item the rows of ``logits[offset:offset+n]`` serve."""

    work_index: int
    positions: tuple[int, ...]
    offset: int


class LogitWants(Sequence):
    """A step's windows with logit rows, in work order: window i belongs to work
    ``work_index[i]``, owns rows ``[bounds[i], bounds[i + 1])`` of the logits, and row j predicts
    position ``positions[j]``. Reads as a sequence of :class:`LogitRequest` (equal to a list of
    the same items)."""

    __slots__ = ("work_index", "bounds", "positions", "_items")

    def __init__(self, work_index: np.ndarray, bounds: np.ndarray, positions: np.ndarray) -> None:
        self.work_index = work_index  # [k] int64
        self.bounds = bounds  # [k + 1] int64, bounds[0] = 0
        self.positions = positions  # [M] int64
        self._items: list[LogitRequest] | None = None

    @classmethod
    def empty(cls) -> "LogitWants":
        return cls(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int64))

    @property
    def rows(self) -> int:
        """Logit rows over every window (M)."""
        return self.positions.size

    @property
    def lens(self) -> np.ndarray:
        """[k] each window's rows (>= 1)."""
        return np.diff(self.bounds)

    def works(self, plan) -> list:
        """The plan's RequestWork of each window, in order (not to be modified: where every
        work has a window, the plan's own list)."""
        if self.work_index.size == len(plan.works):  # increasing indices, as many as works: all of them
            return plan.works
        return list(map(plan.works.__getitem__, self.work_index.tolist()))

    def _list(self) -> list[LogitRequest]:
        if self._items is None:
            bounds, positions = self.bounds.tolist(), self.positions.tolist()
            self._items = [LogitRequest(i, tuple(positions[a:b]), a)
                           for i, a, b in zip(self.work_index.tolist(), bounds, bounds[1:])]
        return self._items

    def __len__(self) -> int:
        return self.work_index.size

    def __getitem__(self, index):
        return self._list()[index]

    def __iter__(self):
        return iter(self._list())

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # mutable-looking and compared by items: like the list it stands for

    def __repr__(self) -> str:
        return f"LogitWants({self._list()!r})"


def logit_wants(open_: np.ndarray, lo: np.ndarray, width: np.ndarray,
                first_row: np.ndarray) -> tuple[LogitWants, np.ndarray]:
    """The rows whose logits a step needs: each decode window's masked positions, in work
    order. Work i's window is ``[lo[i], lo[i] + width[i])`` (width 0: no window) and
    ``open_`` [sum(width)] bool its positions' masked flags, the windows laid end to end; work
    i's position p is predicted by step row ``first_row[i] + p``. -> (the windows with any,
    their rows [M] int64)."""
    n = width.size
    found = np.flatnonzero(open_)  # open positions, as offsets into the windows laid end to end
    if not found.size:
        return LogitWants.empty(), np.zeros(0, np.int64)
    owner = np.repeat(np.arange(n), width)[found]  # nondecreasing
    to_position = lo - (np.cumsum(width) - width)  # [n] an offset of window i -> its position
    positions = to_position[owner] + found
    bounds = np.searchsorted(owner, np.arange(n + 1))
    served = np.flatnonzero(bounds[1:] > bounds[:-1])  # the windows with an open position
    rows = (first_row + to_position)[owner] + found
    return LogitWants(served, np.append(bounds[served], found.size), positions), rows
