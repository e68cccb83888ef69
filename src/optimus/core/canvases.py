"""Every queued and running request's canvas in two flat arrays, so a step reads and writes the
positions of all its requests with one indexed operation each instead of one call per request.

A request the scheduler holds is *adopted*: its ``tokens`` and ``committed`` become views of a
span of :attr:`Canvases.tokens` / :attr:`Canvases.committed`, and ``Request.slot`` indexes the
per-request columns here (``base``, the span's start, the frozen geometry the step plan
reads, and the parameters the finish checks read). Absolute position ``p`` of the request in
slot ``s`` lives at ``base[s] + p``.

Invariants: an adopted request's views are exactly ``tokens[base[s]:base[s] + canvas_end]``
(re-pointed whenever the arrays are compacted or grown); a request is adopted at most once and
released when it leaves the scheduler (finished or aborted), when it gets arrays of its own
again (a copy) and ``slot = -1``. Code that holds a view across a call that may adopt another
request (a compaction moves every span) must fetch it again from the request.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from optimus.core.request import Request

_SLOT = operator.attrgetter("slot")
# Per-slot columns: the span's start, the geometry the step plan reads (core.request.Geometry),
# and what the finish checks read of the request's (frozen) parameters: its max_tokens, and 1
# where it has stop strings.
COLUMNS = ("base", "canvas_start", "canvas_end", "block_size", "block_origin", "shift", "max_tokens",
           "stop_strings")


class Canvases:
    def __init__(self, capacity: int = 1 << 16, slots: int = 64) -> None:
        self.tokens = np.zeros(capacity, np.int64)
        self.committed = np.zeros(capacity, bool)
        self._end = 0  # spans are placed at the end; space freed in between returns at compaction
        self._used = 0  # positions held by live spans
        for name in COLUMNS:
            setattr(self, name, np.zeros(slots, np.int64))
        self._live: dict[int, Request] = {}  # slot -> request
        self._free: list[int] = list(range(slots - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._live)

    def adopt(self, r: Request) -> None:
        """Move ``r``'s canvas into the arrays (no-op if it is already here)."""
        if self._live.get(r.slot) is r:
            return
        if r.slot >= 0:
            raise ValueError(f"request {r.request_id} is held by another scheduler's canvases")
        g = r.geometry
        n = g.canvas_end
        if self._end + n > self.tokens.size:
            self._compact(n)
        if not self._free:
            self._grow_slots()
        slot = self._free.pop()
        base = self._end
        self.tokens[base:base + n] = r.tokens
        self.committed[base:base + n] = r.committed
        self._end += n
        self._used += n
        values = (base, g.canvas_start, n, g.block_size, g.block_origin, g.shift, r.params.max_tokens,
                  bool(r.params.stop))
        for name, value in zip(COLUMNS, values):
            getattr(self, name)[slot] = value
        self._live[slot] = r
        r.slot = slot
        self._point(r)

    def release(self, r: Request) -> None:
        """Give ``r`` arrays of its own again and free its span (no-op if not adopted)."""
        slot = r.slot
        if slot < 0 or self._live.get(slot) is not r:
            return
        r.tokens, r.committed = r.tokens.copy(), r.committed.copy()
        del self._live[slot]
        self._used -= r.geometry.canvas_end
        self._free.append(slot)
        r.slot = -1

    def _point(self, r: Request) -> None:
        base = int(self.base[r.slot])
        end = base + r.geometry.canvas_end
        r.tokens, r.committed = self.tokens[base:end], self.committed[base:end]

    def _compact(self, need: int) -> None:
        """Lay the live spans end to end in arrays large enough for ``need`` more positions
        (at least twice what is live), and re-point every adopted request's views."""
        capacity = max(self.tokens.size, 2 * (self._used + need))
        tokens, committed = np.zeros(capacity, np.int64), np.zeros(capacity, bool)
        end = 0
        for slot, r in self._live.items():
            n = r.geometry.canvas_end
            base = int(self.base[slot])
            tokens[end:end + n] = self.tokens[base:base + n]
            committed[end:end + n] = self.committed[base:base + n]
            self.base[slot] = end
            end += n
        self.tokens, self.committed, self._end = tokens, committed, end
        for r in self._live.values():
            self._point(r)

    def _grow_slots(self) -> None:
        old = self.base.size
        for name in COLUMNS:
            column = getattr(self, name)
            setattr(self, name, np.concatenate([column, np.zeros(old, np.int64)]))
        self._free.extend(range(2 * old - 1, old - 1, -1))

    def window_bounds(self, slots: np.ndarray, cache_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``Request.window_bounds`` of the requests in ``slots`` [n] at cursors ``cache_len``
        [n]: (first predicted position of the next window, its block's end clipped to the canvas)."""
        lo = np.maximum(cache_len + self.shift[slots], self.canvas_start[slots])
        size = self.block_size[slots]
        end = lo + size - (lo - self.block_origin[slots]) % size
        return lo, np.minimum(end, self.canvas_end[slots])

    def plan_windows(self, slots: np.ndarray, lo: np.ndarray, end: np.ndarray, chunks: np.ndarray) -> np.ndarray:
        """``Request.plan_window`` for each of ``slots`` [n] with bounds ``lo``/``end`` and its
        chunk -> the windows' ends ``hi`` [n]: ``lo + chunk`` within the block, stretched past the
        window's committed start to its first masked position where the chunk stops short of it."""
        hi = lo + np.maximum(1, np.minimum(chunks, end - lo))
        base = self.base[slots]
        late = np.flatnonzero((hi < end) & self.committed[base + lo])  # starts committed: may stretch
        if late.size:
            lo_l, end_l, hi_l = lo[late], end[late], hi[late]
            after = np.arange(1, int((end_l - lo_l).max()))  # offsets of the positions after lo
            pos = lo_l[:, None] + after
            inside = pos < end_l[:, None]
            masked = inside & ~self.committed[base[late, None] + np.minimum(pos, end_l[:, None] - 1)]
            first_open = np.where(masked.any(1), lo_l + 1 + masked.argmax(1), end_l)
            stretch = (hi_l <= first_open) & (first_open < end_l)
            hi[late[stretch]] = first_open[stretch] + 1
        return hi

    @staticmethod
    def slots(requests) -> np.ndarray | None:
        """``requests``' slots [n] (one C-level pass), or None unless every one is adopted (then
        the array paths apply). A request is adopted by one Canvases at most, its scheduler's,
        and a step plan carries only its scheduler's, so a slot is enough to tell."""
        requests = list(requests)
        slots = np.fromiter(map(_SLOT, requests), np.int64, len(requests))
        return slots if not slots.size or slots.min() >= 0 else None
