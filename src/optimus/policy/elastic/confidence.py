"""Per request, how its own commits compare with the shared ``tau`` (the elastic controller's
per-request confidence levels)."""

from __future__ import annotations

import itertools
import math

import numpy as np


CONFIDENCE_LEVELS = tuple(2.0 ** k for k in range(-8, 3))  # 1/256 ... 4, factors of two


class RequestConfidence:
    """Per request, ``r = (w0 + S) / (w0 + E)``: ``S`` its decayed excess commits
    (``committed - 1``) and ``E`` the excess the shared estimate expected (``tau(C) - 1``), over
    its steps with ``C > 1`` (a chunk of one always commits one: no evidence). The request plans
    on its own curve ``1 + L (tau(C) - 1)``, ``L`` one of :data:`CONFIDENCE_LEVELS` (so the
    planner builds one ladder per level), starting at 1 (the shared curve).

    ``L`` moves only when ``r`` leaves ``[L / band, L * band]``, to the level nearest ``r`` on
    a log scale: a Schmitt trigger per request, so the commit noise of a homogeneous population
    does not move anyone. No level is 0: prose that commits 1.05 tokens per step at C = 32
    still gains its 5% from a large chunk when the step is free anyway (low load).

    Every step of the request decays ``S`` and ``E`` (by ``decay``) whether or not it brings
    evidence, so a request parked at ``C = 1`` drifts back toward ``r = 1`` and retries a
    larger chunk now and then (tens of steps apart): text that turns confident is found again.
    A request not observed for ``forget_after`` observations has left (finished, or waits to
    be recomputed): its entry is dropped. One absent from a step or a few (the other half of a
    pipelined step, a step that did not plan it) keeps it."""

    def __init__(self, prior_weight: float = 4.0, decay: float = 0.95, band: float = 2.0,
                 forget_after: int = 64) -> None:
        if prior_weight <= 0 or not 0.0 < decay <= 1.0 or band <= 1.0 or forget_after < 1:
            raise ValueError("request confidence needs prior_weight > 0, decay in (0, 1], band > 1 "
                             "and forget_after >= 1")
        self.prior_weight, self.decay, self.band = prior_weight, decay, band
        self.forget_after = forget_after
        self._level: dict[str, float] = {}  # every request held, what ``levels`` reads
        # Per request held, a row of the arrays (updated a step's requests at once): S, E, its
        # level again, and the observation that last held it. Freed rows are reused.
        self._row: dict[str, int] = {}
        self._ids: list[str | None] = []  # row -> its request (None: free)
        self._free: list[int] = []
        self._s, self._e, self._lvl = np.zeros(0), np.zeros(0), np.zeros(0)
        self._seen = np.zeros(0, dtype=np.int64)
        self._observations = 0

    @property
    def _excess(self) -> dict[str, tuple[float, float]]:
        """request -> (S, E) of the class docstring."""
        return {rid: (float(self._s[i]), float(self._e[i])) for rid, i in self._row.items()}

    def observe(self, request_ids: tuple[str, ...], chunk_sizes, committed, expected: np.ndarray) -> None:
        """``expected``: the shared ``tau`` at each request's chunk size (same order). A step
        holds each request once (one window), so its rows are distinct."""
        self._observations += 1
        now = self._observations
        rows = self._rows_of(request_ids)
        c, k = np.asarray(chunk_sizes), np.asarray(committed)
        s, e = self.decay * self._s[rows], self.decay * self._e[rows]
        evidence = c > 1  # a chunk of one always commits one
        s = np.where(evidence, s + np.minimum(k, c) - 1, s)
        e = np.where(evidence, e + np.maximum(np.asarray(expected, dtype=float) - 1.0, 0.0), e)
        self._s[rows], self._e[rows], self._seen[rows] = s, e, now
        level, band = self._lvl[rows], self.band
        r = (self.prior_weight + s) / (self.prior_weight + e)  # r of the class docstring
        for i in np.flatnonzero(~((level / band <= r) & (r <= level * band))).tolist():
            self._lvl[rows[i]] = self._level[request_ids[i]] = _nearest_level(float(r[i]))
        if now % self.forget_after == 0:
            self._forget(now)

    def _rows_of(self, request_ids) -> np.ndarray:
        """Each request's row; a request not held gets a fresh one (S = E = 0, level 1)."""
        rows = list(map(self._row.get, request_ids))
        if None in rows:
            for i, row in enumerate(rows):
                if row is None:
                    rows[i] = self._take(request_ids[i])
        return np.array(rows, dtype=np.intp)

    def _take(self, request_id: str) -> int:
        if not self._free:
            grow = max(len(self._ids), 64)
            self._free = list(range(len(self._ids) + grow - 1, len(self._ids) - 1, -1))
            self._ids += [None] * grow
            self._s, self._e = np.resize(self._s, len(self._ids)), np.resize(self._e, len(self._ids))
            self._lvl, self._seen = np.resize(self._lvl, len(self._ids)), np.resize(self._seen, len(self._ids))
        row = self._free.pop()
        self._ids[row], self._row[request_id], self._level[request_id] = request_id, row, 1.0
        self._s[row], self._e[row], self._lvl[row] = 0.0, 0.0, 1.0
        return row

    def _forget(self, now: int) -> None:
        """Drop the requests no observation held for ``forget_after``: they have left."""
        held = np.fromiter((rid is not None for rid in self._ids), bool, len(self._ids))
        for row in np.flatnonzero(held & (now - self._seen >= self.forget_after)).tolist():
            rid = self._ids[row]
            del self._row[rid], self._level[rid]
            self._ids[row] = None
            self._free.append(row)

    def level(self, request_id: str) -> float:
        return self._level.get(request_id, 1.0)

    def levels(self, request_ids) -> list[float]:
        """``level`` of each, in one pass."""
        return list(map(self._level.get, request_ids, itertools.repeat(1.0)))


def _nearest_level(r: float) -> float:
    """The confidence level nearest ``r`` in log scale (a level that left its band moves there)."""
    return min(CONFIDENCE_LEVELS, key=lambda v: abs(math.log(v / r)))
