"""The host's share of a step's latency: the time the step waits on the host (building its
batch, committing its tokens) beside its time on the device."""

from __future__ import annotations

import collections
import math

import numpy as np


class HostShare:
    """``h(n) = a + b n`` seconds for a step of ``n`` tokens (``a, b >= 0``), a Theil-Sen line
    (the median of the pairwise slopes, then the median intercept) through the last ``window``
    steps. Linear, because a step's batch build and commit grow with its rows while the
    scheduling around them grows with its requests; medians, because one step that paid a
    one-time cost (a first allocation, a collection) would otherwise price every step like it,
    and a plan that avoids such steps (overlapped ones) would never see that it was wrong.
    Fewer than ``min_steps`` steps: no host time (the plans that would pay it get tried).
    After ``forget_after`` steps in a row that taught none (:meth:`idle_step`), the window is
    emptied: steps at one open position a window overlap and teach nothing, so a policy held
    there by a wrong line would keep it for good. On the H100 (LLaDA2.0-mini, 16 requests)
    elastic ended a sweep on a line of 26 us a row and no intercept (its other runs: 0.3-0.9 us
    and 0.4-0.8 ms), priced size 16's host time at 8 ms (fixed:16 measured 1.3 ms a step) and
    ran size 1 in every run, 0.89x fixed:16.

    The fit is updated per step, not redone (it runs every step of a GPU-timed run): each
    point's slopes to the others are kept in a ``window`` x ``window`` table and all of them
    in one sorted array, so a step only swaps the leaving point's slopes for the new one's.
    It equals :func:`theil_sen` on the window exactly: the same slopes (a slope is the same
    float whichever point comes first), so the same medians."""

    def __init__(self, window: int = 64, min_steps: int = 4, forget_after: int = 128) -> None:
        self.min_steps, self.forget_after = min_steps, forget_after
        self._empty(window)

    def _empty(self, window: int) -> None:
        self.intercept, self.slope = 0.0, 0.0
        # Ring slot per point (slot = arrival mod window); a pair's slope, nan where the two
        # points have equal tokens (no slope) or a slot is empty.
        self._n, self._h = np.zeros(window), np.zeros(window)
        self._pair = np.full((window, window), np.nan)
        self._sorted = np.zeros(0)  # every finite entry of the pair table's upper triangle, ascending
        self._seen = 0  # points observed
        self._idle = 0  # steps since the last point

    @property
    def points(self) -> int:
        """Steps in the window."""
        return min(self._seen, len(self._n))

    def window(self) -> tuple[np.ndarray, np.ndarray]:
        """The window's (tokens, seconds), in ring order."""
        return self._n[:self.points].copy(), self._h[:self.points].copy()

    def observe(self, tokens: int, seconds: float) -> None:
        """A step's host seconds beside its ``tokens``; a non-finite time is no measurement."""
        if not math.isfinite(seconds):
            return
        self._replace(self._seen % len(self._n), float(max(tokens, 1)), max(float(seconds), 0.0))
        self._seen, self._idle = self._seen + 1, 0
        if self.points >= self.min_steps:
            self._fit()

    def idle_step(self) -> None:
        """A step that taught no host share (overlapped, mostly prompts, or no device time)."""
        self._idle += 1
        if self._idle >= self.forget_after and self._seen:
            self._empty(len(self._n))

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        return self.intercept + self.slope * np.asarray(tokens, dtype=float)

    def _replace(self, slot: int, n: float, h: float) -> None:
        """Slot ``slot`` now holds (n, h): its old slopes leave the sorted array, its new ones join."""
        old = self._pair[slot]
        self._sorted = _remove_sorted(self._sorted, np.sort(old[np.isfinite(old)]))
        live = min(self._seen + 1, len(self._n))  # slots in use once this point is in
        self._n[slot], self._h[slot] = n, h
        dn, dh = n - self._n[:live], h - self._h[:live]
        apart = dn != 0.0  # excludes the slot itself
        row = np.full(len(self._n), np.nan)
        row[:live][apart] = dh[apart] / dn[apart]
        self._pair[slot], self._pair[:, slot] = row, row
        new = np.sort(row[np.isfinite(row)])
        self._sorted = np.insert(self._sorted, np.searchsorted(self._sorted, new), new)

    def _fit(self) -> None:
        slopes, live = self._sorted, self.points
        self.slope = max(0.0, _median_of_sorted(slopes)) if slopes.size else 0.0  # more rows never cost less
        self.intercept = max(0.0, _median(self._h[:live] - self.slope * self._n[:live]))


class StepGaps:
    """The host's time between steps that a whole step pays (``StepFeedback.overhead_s``): the
    median gap of the last ``window`` whole decoding steps, so that one pause (a collection, a
    first call) does not price every step; none before ``min_steps`` of them.

    A gap before an overlapped step holds all of that and more (the report and assumed commits
    of the step in flight), so the median of those bounds it from above. The bound is what
    unlocks a wrong estimate: priced too high, whole steps lose to overlapped size-1 steps,
    and a policy that then runs only those would never measure a whole step's gap again (on
    the H100, one 35 ms gap at the start held LLaDA2.0-mini at size 1 through a whole sweep)."""

    def __init__(self, window: int = 32, min_steps: int = 4) -> None:
        self.min_steps = min_steps
        self._whole: collections.deque[float] = collections.deque(maxlen=window)
        self._overlapped: collections.deque[float] = collections.deque(maxlen=window)
        self.seconds = 0.0

    def observe(self, gap_s: float, overlapped: bool) -> None:
        """A decoding step's gap since the step before it; 0 (unknown) and non-finite are none."""
        if not (gap_s > 0 and math.isfinite(gap_s)):
            return
        (self._overlapped if overlapped else self._whole).append(gap_s)
        whole = float(np.median(self._whole)) if len(self._whole) >= self.min_steps else 0.0
        bound = float(np.median(self._overlapped)) if len(self._overlapped) >= self.min_steps else math.inf
        self.seconds = min(whole, bound)


def theil_sen(n: np.ndarray, h: np.ndarray) -> tuple[float, float]:
    """(intercept, slope), each at least 0, of the Theil-Sen line through points (n, h)."""
    i, j = np.triu_indices(len(n), 1)
    apart = n[j] != n[i]
    slopes = (h[j] - h[i])[apart] / (n[j] - n[i])[apart]
    slope = max(0.0, float(np.median(slopes))) if slopes.size else 0.0
    return max(0.0, float(np.median(h - slope * n))), slope


def _median(values: np.ndarray) -> float:
    """``np.median`` of a 1-d array without its checks: the middle order statistics, partitioned."""
    mid = len(values) // 2
    return _median_of_sorted(np.partition(values, [mid - 1, mid] if len(values) % 2 == 0 else [mid]))


def _median_of_sorted(values: np.ndarray) -> float:
    """``np.median`` of an array ascending at least about its middle, read off it (the same
    mean of the middle pair)."""
    mid = len(values) // 2
    return float(np.mean(values[mid - 1:mid + 1])) if len(values) % 2 == 0 else float(values[mid])


def _remove_sorted(values: np.ndarray, gone: np.ndarray) -> np.ndarray:
    """``values`` (ascending) without one entry equal to each of ``gone`` (ascending, all present):
    the k-th repeat of a value in ``gone`` removes the k-th entry equal to it."""
    if not gone.size:
        return values
    repeat = np.arange(len(gone)) - np.searchsorted(gone, gone)
    return np.delete(values, np.searchsorted(values, gone) + repeat)
