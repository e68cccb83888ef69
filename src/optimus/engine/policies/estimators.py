"""The two slowly-moving estimates the elastic controller decides from.

- :class:`TauEstimator`: tokens committed per step ``tau(C)`` for each chunk size, a decayed
  running mean seeded by a prior, made monotone non-decreasing in ``C`` and kept in ``[1, C]``.
- :class:`LatencyCorrector`: a multiplicative correction ``T_real(n) / T_profile(n)`` learned
  from measured step latencies, piecewise linear in ``log2(n)`` over power-of-two anchors.

Both move by bounded amounts per step; that is what lets the controller's decisions settle.
"""

from __future__ import annotations

import math

import numpy as np

from optimus.engine.latency import _isotonic


def default_tau_prior(c: int) -> float:
    """Optimistic concave prior ``C**0.6`` (1, 1.5, 2.3, 3.5, 5.3, 8, 12): optimistic so that an
    untried size is tried rather than starved; overwritten as soon as the size is observed."""
    return float(c) ** 0.6


class TauEstimator:
    """Per chunk size ``C``: ``S = g*S + sum(committed)``, ``W = g*W + count`` once per step in
    which ``C`` ran (``g = decay``); the prior enters as ``prior_weight`` pseudo-observations.
    Sizes that do not run keep their estimate (no drift without evidence)."""

    def __init__(self, sizes: tuple[int, ...], prior: dict[int, float] | None = None,
                 prior_weight: float = 8.0, decay: float = 0.98) -> None:
        if not 0.0 < decay <= 1.0 or prior_weight <= 0:
            raise ValueError("tau estimator needs decay in (0, 1] and prior_weight > 0")
        self.decay = decay
        prior = dict(prior) if prior else {c: default_tau_prior(c) for c in sizes}
        prior.setdefault(1, 1.0)
        self._sum = {int(c): prior_weight * float(t) for c, t in prior.items()}
        self._weight = {int(c): prior_weight for c in prior}
        self._table: tuple[np.ndarray, np.ndarray] | None = None

    def observe(self, chunk_sizes: tuple[int, ...], committed: tuple[int, ...]) -> None:
        step: dict[int, list[int]] = {}
        for c, k in zip(chunk_sizes, committed):
            if c >= 1:
                step.setdefault(int(c), []).append(min(int(k), int(c)))
        for c, ks in step.items():
            self._sum[c] = self.decay * self._sum.get(c, 0.0) + sum(ks)
            self._weight[c] = self.decay * self._weight.get(c, 0.0) + len(ks)
        if step:
            self._table = None

    @property
    def table(self) -> tuple[np.ndarray, np.ndarray]:
        """Sizes [K] ascending and their monotone estimates [K], each in [1, size]."""
        if self._table is None:
            sizes = np.array(sorted(self._sum), dtype=float)
            means = np.array([self._sum[int(c)] / self._weight[int(c)] for c in sizes])
            weights = np.array([self._weight[int(c)] for c in sizes])
            # A pooled value never exceeds the smallest size of its pool, so [1, C] still holds.
            self._table = sizes, _isotonic(np.clip(means, 1.0, sizes), weights)
        return self._table

    def __call__(self, c: np.ndarray | int) -> np.ndarray:
        """tau for any sizes: linear between known sizes, flat beyond them, capped at C."""
        sizes, taus = self.table
        c = np.asarray(c, dtype=float)
        return np.clip(np.interp(c, sizes, taus), 1.0, np.maximum(c, 1.0))

    def snapshot(self) -> dict[int, float]:
        sizes, taus = self.table
        return {int(c): float(t) for c, t in zip(sizes, taus)}


class LatencyCorrector:
    """``log(T_real / T_profile)`` as a piecewise-linear function of ``log2(n)`` with anchors at
    ``n = 1, 2, 4, ..., 2**max_log2``. Each measurement moves the two anchors around its ``n``
    by ``rate`` times its share of the residual (normalised least mean squares), with the
    residual clipped to ``+-max_step`` (a stall or a compile cannot throw the model) and every
    anchor clipped to ``+-max_log`` (the profile is never overruled by more than ``e**max_log``).
    """

    def __init__(self, rate: float = 0.03, max_step: float = math.log(2.0), max_log: float = math.log(4.0),
                 max_log2: int = 17) -> None:
        if not 0.0 < rate <= 1.0:
            raise ValueError("latency correction rate must be in (0, 1]")
        self.rate, self.max_step, self.max_log = rate, max_step, max_log
        self.log_ratio = np.zeros(max_log2 + 1)

    def _bracket(self, n: float) -> tuple[int, float]:
        x = min(max(math.log2(max(n, 1.0)), 0.0), len(self.log_ratio) - 1.0)
        k = min(int(x), len(self.log_ratio) - 2)
        return k, x - k

    def factor(self, n: np.ndarray) -> np.ndarray:
        """Multiplicative correction for step token counts ``n`` [K]."""
        x = np.clip(np.log2(np.maximum(np.asarray(n, dtype=float), 1.0)), 0.0, len(self.log_ratio) - 1.0)
        return np.exp(np.interp(x, np.arange(len(self.log_ratio)), self.log_ratio))

    def observe(self, n: int, measured_s: float, predicted_s: float) -> None:
        if not (measured_s > 0 and predicted_s > 0):
            return
        k, w = self._bracket(n)
        current = (1 - w) * self.log_ratio[k] + w * self.log_ratio[k + 1]
        residual = float(np.clip(math.log(measured_s / predicted_s) - current, -self.max_step, self.max_step))
        norm = (1 - w) ** 2 + w ** 2  # NLMS: the interpolated value moves by rate * residual
        self.log_ratio[k] += self.rate * residual * (1 - w) / norm
        self.log_ratio[k + 1] += self.rate * residual * w / norm
        np.clip(self.log_ratio, -self.max_log, self.max_log, out=self.log_ratio)


class TokenLoad:
    """Tokens per step beyond the amortised cost of the requests the policy sizes: their
    smoothed mean (prefill pieces, pinned requests) and the variance of the step's token count
    that the store model does not explain. EWMA with rate ``rate`` for both."""

    def __init__(self, rate: float = 0.05) -> None:
        if not 0.0 < rate <= 1.0:
            raise ValueError("token load rate must be in (0, 1]")
        self.rate = rate
        self.mean = 0.0
        self._var = 0.0  # of (step tokens - amortised own cost)
        self._model_var = 0.0  # the part the store model predicts

    @property
    def extra_var(self) -> float:
        return max(0.0, self._var - self._model_var)

    def observe(self, num_tokens: int, own_cost: float, own_var: float) -> None:
        residual = max(0.0, num_tokens - own_cost) - self.mean
        self.mean += self.rate * residual
        self._var += self.rate * (residual * residual - self._var)
        self._model_var += self.rate * (own_var - self._model_var)
