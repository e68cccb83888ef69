"""Request arrival times: a renewal process with gamma-distributed gaps.

A gap has shape ``k = burstiness`` and scale ``1 / (rate * k)``, so its mean is ``1 / rate``
whatever ``k``; its coefficient of variation is ``1 / sqrt(k)``: ``k = 1`` is a Poisson process,
``k < 1`` burstier, ``k -> inf`` evenly spaced. The first request leaves at t = 0."""

from __future__ import annotations

import math

import numpy as np


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times in seconds from the start, non-decreasing, ``n`` of them."""
    if n < 1:
        return []
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"rate and burstiness must be > 0, got rate={rate}, burstiness={burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    if math.isinf(burstiness):
        gaps = np.full(n - 1, 1.0 / rate)
    else:
        gaps = np.random.default_rng(seed).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return [0.0] + np.cumsum(gaps).tolist()
