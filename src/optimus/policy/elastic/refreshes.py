"""The rows a cache scheme's block-start refreshes add to the steps (dual cache: prompt + canvas
recomputed once per block of commits), as the elastic controller prices them.

Their mean is known ahead, ``rho = R / B`` rows per committed token (``R`` the rows of one
refresh, ``StepView.refresh_rows``; ``B`` the block). Learned from the steps' rows instead, it
swung between 8 and 22 rows per commit with the refresh waves (LLaDA-8B shape, dual cache, 128
requests, CPU replay of the H100's steps; the truth 12), and the plan with it.

How they spread over the steps is learned: requests that progress together refresh together,
a wave of many refreshes every few steps and none between; requests out of step refresh one or
two at a time. The spread is kept as an index of dispersion ``D`` (variance of a step's refresh
rows over their mean), so a plan that commits more is priced with proportionally more, equally
lumpy, refresh rows: ``var = D * mean``. Until steps are seen, ``D = R`` (independent requests).
"""

from __future__ import annotations

import numpy as np

TOLERANCE = 0.05  # relative move of the refresh rows that reprices the plans


class RefreshLoad:
    def __init__(self, rate: float = 0.05) -> None:
        self.rate = rate
        self.rows = 0.0  # R: rows of one refresh (0: the scheme never refreshes)
        self.per_commit = 0.0  # rho
        self._square = 0.0  # EWMA of (refresh rows - their expected count)^2 per step
        self._expected = 0.0  # EWMA of the expected refresh rows per step
        self._seen = 0

    def see(self, refresh_rows: float, blocks: np.ndarray) -> bool:
        """The step view's refresh rows (``StepView.refresh_rows``) at these block sizes;
        -> whether the price changed. A move under ``TOLERANCE`` keeps the old one: with
        requests of unequal lengths the mean moves whenever one arrives or ends, and each
        change costs the plans cached for the step (a host cost on every one)."""
        per_commit = refresh_rows / max(float(np.mean(blocks)), 1.0) if refresh_rows and len(blocks) else 0.0
        if abs(refresh_rows - self.rows) <= TOLERANCE * self.rows and abs(per_commit - self.per_commit) <= (
                TOLERANCE * self.per_commit) and bool(refresh_rows) == bool(self.rows):
            return False
        self.rows, self.per_commit = refresh_rows, per_commit
        return True

    @property
    def dispersion(self) -> float:
        if self._seen < 8 or self._expected <= 0:
            return self.rows
        return self._square / self._expected

    def lump(self, commits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, variance) of the refresh rows of steps committing ``commits`` [K]."""
        mean = self.per_commit * commits
        return mean, self.dispersion * mean

    def observe(self, refresh_rows: int, committed: int) -> None:
        """A step ran ``refresh_rows`` refresh rows beyond its windows and committed ``committed``."""
        if not self.per_commit:
            return
        expected = self.per_commit * committed
        self._square += self.rate * ((refresh_rows - expected) ** 2 - self._square)
        self._expected += self.rate * (expected - self._expected)
        self._seen += 1
