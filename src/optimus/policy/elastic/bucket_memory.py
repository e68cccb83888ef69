"""What each CUDA-graph bucket measured: the latency of the buckets steps ran, kept apart.

With graphs, a step's device time is its bucket's: a staircase in its rows (graph_buckets.py).
:class:`~optimus.policy.elastic.estimators.LatencyCorrector` fits one smooth correction of
the profile (scale and stretch) to the last 256 steps, so a bucket those steps did not run is
priced by that fit's extrapolation, and a bucket they did run only as well as one curve fits
them all. On an H100 (SDAR-8B shape, 64 requests, regime ``real-8b``) the start-up profile put
the 128-row graph at 8.66 ms and the 256-row one at 9.58, the steps took 8.45 and 9.84: size 1
(128 rows) was 7% faster in wall time than size 2 (256 rows, host time beside), the controller
priced the two within its 2% hysteresis, and 64-request elastic ran 0.92-0.95 of ar.

:class:`BucketMemory` keeps, for each bucket, a moving average of the log ratio of measured to
profiled time (same bucket, same batch: the profile carries the batch's attention cost) over
decoding steps, and prices a bucket measured within its memory at the profile times that
ratio. Buckets it does not remember keep the correction's price: optimistic past what was
measured, so the controller still goes and measures them. Steps past the largest graph run
eagerly, launch by launch, and are kept by band (``GraphBuckets.key``): the host's launch pace,
not their rows, sets their time (on an H100, LLaDA-8B dual-cache steps of 520-592 rows took
16-39 ms eagerly where the 512-row graph takes 14).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np


class BucketMemory:
    """``rate``: weight of a new step in its bucket's average; ``min_steps``: steps a bucket
    must have measured before its average replaces the correction; ``max_age``: steps (of any
    bucket) after which a bucket not run since is forgotten (cache lengths and the device's
    clock drift, and the correction then prices it again from what ran lately)."""

    def __init__(self, rate: float = 1 / 16, min_steps: int = 4, max_age: int = 2048) -> None:
        if not 0 < rate <= 1 or min_steps < 1 or max_age < 1:
            raise ValueError("bucket memory needs 0 < rate <= 1, min_steps >= 1 and max_age >= 1")
        self.rate, self.min_steps, self.max_age = rate, min_steps, max_age
        self._log_ratio: dict[float, float] = {}
        self._count: dict[float, int] = {}
        self._last: dict[float, int] = {}  # the step that last measured each bucket
        self._steps = 0
        self._table: tuple[np.ndarray, np.ndarray] | None = None  # (buckets, ratios) it prices; None: stale

    def observe(self, bucket: float, measured_s: float, profiled_s: float) -> None:
        """One decoding step under ``bucket`` (``GraphBuckets.key``: its graph's rows, or its band
        of eager steps) that took ``measured_s`` where the profile says ``profiled_s``."""
        self._steps += 1
        self._table = None
        if not (measured_s > 0 and profiled_s > 0):
            return
        # The first steps average plainly, later ones move the average by ``rate``; a bucket
        # forgotten starts afresh.
        count = self._count.get(bucket, 0) if self._fresh(bucket) else 0
        prev = self._log_ratio.get(bucket, 0.0)
        self._log_ratio[bucket] = prev + max(self.rate, 1.0 / (count + 1)) * (math.log(measured_s / profiled_s) - prev)
        self._count[bucket] = count + 1
        self._last[bucket] = self._steps

    def _fresh(self, bucket: float) -> bool:
        return bucket in self._last and self._steps - self._last[bucket] <= self.max_age

    def known(self) -> dict[float, float]:
        """Ratio measured / profiled by bucket, for the buckets it prices."""
        return {b: math.exp(x) for b, x in self._log_ratio.items()
                if self._count[b] >= self.min_steps and self._fresh(b)}

    def apply(self, keys: np.ndarray, rows: np.ndarray, corrected: np.ndarray,
              profiled: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Latency of steps under ``keys`` [K] (``GraphBuckets.key``) that run ``rows`` [K]: the
        profile's (``profiled(rows)``) times the key's ratio where it remembers the key, else
        ``corrected`` [K]."""
        if self._table is None:  # built once between two observed steps (many curves read it)
            known = self.known()
            self._table = np.array(sorted(known)), np.array([known[b] for b in sorted(known)])
        buckets, ratios = self._table
        if not buckets.size:
            return corrected
        keys = np.asarray(keys, dtype=float)
        at = np.minimum(np.searchsorted(buckets, keys), len(buckets) - 1)
        hit = buckets[at] == keys
        return np.where(hit, profiled(np.asarray(rows, dtype=float)) * ratios[at], corrected) if hit.any() else corrected
