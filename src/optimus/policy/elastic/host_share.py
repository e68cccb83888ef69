"""The host's share of a step's latency: the time the step waits on the host (building its
batch, committing its tokens) beside its time on the device."""

from __future__ import annotations

import collections

import numpy as np


class HostShare:
    """``h(n) = a + b n`` seconds for a step of ``n`` tokens (``a, b >= 0``), a Theil-Sen line
    (the median of the pairwise slopes, then the median intercept) through the last ``window``
    steps. Linear, because a step's batch build and commit grow with its rows while the
    scheduling around them grows with its requests; medians, because one step that paid a
    one-time cost (a first allocation, a collection) would otherwise price every step like it,
    and a plan that avoids such steps (overlapped ones) would never see that it was wrong.
    Fewer than ``min_steps`` steps: no host time (the plans that would pay it get tried)."""

    def __init__(self, window: int = 64, min_steps: int = 4) -> None:
        self._points: collections.deque[tuple[float, float]] = collections.deque(maxlen=window)
        self.min_steps = min_steps
        self.intercept, self.slope = 0.0, 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        self._points.append((float(max(tokens, 1)), max(float(seconds), 0.0)))
        if len(self._points) >= self.min_steps:
            self._fit()

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        return self.intercept + self.slope * np.asarray(tokens, dtype=float)

    def _fit(self) -> None:
        n, h = np.array(self._points).T
        i, j = np.triu_indices(len(n), 1)
        apart = n[j] != n[i]
        slopes = (h[j] - h[i])[apart] / (n[j] - n[i])[apart]
        self.slope = max(0.0, float(np.median(slopes))) if slopes.size else 0.0  # more rows never cost less
        self.intercept = max(0.0, float(np.median(h - self.slope * n)))
