"""The host's share of a step's latency: the time the step waits on the host (building its
batch, committing its tokens) beside its time on the device."""

from __future__ import annotations

import collections

import numpy as np


class HostShare:
    """``h(n) = a + b n`` seconds for a step of ``n`` tokens (``a, b >= 0``): least squares over
    the last ``window`` steps. Linear, because a step's batch build and commit grow with its rows
    while the scheduling around them grows with its requests; a prompt's whole prefill (thousands
    of rows) then reads as many rows' host time, not as every step's. Steps of one size alone
    give no slope: their mean, for every size (the scheduling part, per request, dominates);
    no steps: no host time."""

    def __init__(self, window: int = 64) -> None:
        self._points: collections.deque[tuple[float, float]] = collections.deque(maxlen=window)
        self.intercept, self.slope = 0.0, 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        self._points.append((float(max(tokens, 1)), max(float(seconds), 0.0)))
        self._fit()

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        return self.intercept + self.slope * np.asarray(tokens, dtype=float)

    def _fit(self) -> None:
        n, h = np.array(self._points).T
        if np.ptp(n) == 0:
            self.intercept, self.slope = float(h.mean()), 0.0
            return
        slope, intercept = np.polyfit(n, h, 1)
        if slope < 0:  # more rows never cost the host less: the mean alone
            slope, intercept = 0.0, h.mean()
        elif intercept < 0:  # through the origin
            slope, intercept = float((n * h).sum() / (n * n).sum()), 0.0
        self.intercept, self.slope = float(intercept), float(slope)
