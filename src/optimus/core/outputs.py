"""What the engine hands back to callers: per-request outputs, statistics and commit events."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple


class TokenIds(Sequence):
    """The first ``n`` ids of a list, without copying them: an output's cumulative answer costs
    O(1) a step instead of a copy of the whole answer for every request (quadratic in its length).
    Reads like the tuple it stands for (equal to one with the same ids; slices are tuples).

    Invariant (the owner's): the list's first ``n`` items never change; it may grow at its end.
    An owner that must drop items replaces the list instead of editing it."""

    __slots__ = ("_ids", "_n")

    def __init__(self, ids: list[int], n: int | None = None) -> None:
        self._ids, self._n = ids, len(ids) if n is None else n

    def __len__(self) -> int:
        return self._n

    def shares_list(self, other) -> bool:
        """Whether ``other`` is a view of the same list: then, by the owner's invariant, the
        shorter of the two is a prefix of the longer (found in O(1), not by comparing ids)."""
        return isinstance(other, TokenIds) and other._ids is self._ids

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self._n)
            if step == 1:
                return tuple(self._ids[start:stop])  # the usual slice: the ids since a base
            return tuple(self._ids[i] for i in range(start, stop, step))
        if not -self._n <= index < self._n:
            raise IndexError("token index out of range")
        return self._ids[index % self._n]

    def __iter__(self):
        return itertools.islice(self._ids, self._n)

    def __eq__(self, other) -> bool:
        if isinstance(other, (TokenIds, tuple, list)):
            return len(other) == self._n and tuple(self) == tuple(other)
        return NotImplemented

    def __add__(self, other) -> tuple[int, ...]:
        return tuple(self) + tuple(other)

    def __radd__(self, other):  # a tuple or list before it: that type, as with tuples
        return other + type(other)(self)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(self))

    def __reduce__(self):  # pickled (replicas, engine messages) as the tuple it stands for
        return tuple, (tuple(self),)


def extended(ids: list[int], base: int, new) -> list[int]:
    """``ids[:base] + new`` as TokenIds' owner must: ``ids`` grown in place when it keeps every
    item, else a new list (views already handed out keep the old one)."""
    if base < len(ids):
        ids = ids[:base]
    ids.extend(new)
    return ids


@dataclass
class RequestStats:
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    steps: int = 0  # steps this request took part in while decoding
    tokens_computed: int = 0  # canvas positions run through the model (chunk + commit groups)
    tokens_committed: int = 0
    chunk_sizes: dict[int, int] = field(default_factory=dict)  # chunk size -> steps at that size
    committed_per_chunk: dict[int, int] = field(default_factory=dict)  # chunk size -> tokens committed
    chunk_history: list[int] = field(default_factory=list)  # window size of each decode step that committed, in order
    preemptions: int = 0

    @property
    def tokens_per_step(self) -> float:
        return self.tokens_committed / self.steps if self.steps else 0.0


class CommitEvent(NamedTuple):  # a tuple: one is built per decoding request per step
    """Positions committed in one step; positions are offsets in the canvas (0 = first output)."""

    step: int
    chunk_start: int
    chunk_end: int
    positions: tuple[int, ...]
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: Sequence[int]  # the contiguous committed prefix of the answer, stop-trimmed (a TokenIds)
    text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    stats: RequestStats
    events: tuple[CommitEvent, ...] = ()  # commits since the previous output of this request
