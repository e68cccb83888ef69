"""What drives a mixture-of-experts step's cost: the experts its tokens touch, not only the
tokens.

At small steps an MoE layer's time is the time to read the weights of the experts its tokens
route to. ``n`` tokens, each choosing ``k`` of ``E`` experts, touch on average
``E * (1 - (1 - k/E)**n)`` distinct experts per layer when every expert is equally likely
(the marginal of any top-k router over exchangeable scores, group-limited routing included):
8 at one token of LLaDA2.0-mini (k = 8, E = 256), 163 at 32, 222 at 64, then all of them. So
the curve rises steeply from the first token and flattens once every expert is read, until
compute takes over: no flat stretch before a knee, which is what a dense model's hinge assumes.

:class:`ExpertCostModel` fits ``T(n, b) = a + w * touched(n) / E + c * n + d * b`` (``b``
requests; non-negative coefficients, relative error) to a profile's points. The latency
profile anchors its interpolation on it (see ``latency._Curve``) for MoE models.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class ExpertRouting:
    """``top_k`` of ``experts`` routed experts per token (per MoE layer)."""

    experts: int
    top_k: int

    def __post_init__(self) -> None:
        if not 0 < self.top_k <= self.experts:
            raise ValueError(f"expert routing needs 0 < top_k <= experts, got {self.top_k} of {self.experts}")

    @classmethod
    def of(cls, spec) -> "ExpertRouting | None":
        """The routing of a model spec's sparse layers; None for a dense model."""
        moe = spec.arch.moe
        return None if moe is None else cls(moe.num_experts, moe.top_k)

    def touched(self, tokens: np.ndarray | float) -> np.ndarray:
        """Expected distinct experts per layer that ``tokens`` routed tokens read [same shape]."""
        n = np.maximum(np.asarray(tokens, dtype=float), 0.0)
        return self.experts * -np.expm1(n * np.log1p(-self.top_k / self.experts)) if self.top_k < self.experts \
            else np.where(n > 0, float(self.experts), 0.0)

    def to_json(self) -> dict:
        return {"experts": self.experts, "top_k": self.top_k}

    @classmethod
    def from_json(cls, data: dict | None) -> "ExpertRouting | None":
        return None if data is None else cls(int(data["experts"]), int(data["top_k"]))


@dataclass(frozen=True)
class ExpertCostModel:
    """``T(n, b) = a + w * touched(n) / E + c * n + d * b`` seconds; every coefficient >= 0.
    ``w``: the time to read every expert of every layer once; ``c``: per token (compute,
    activations); ``d``: per request (its cache, its logits); ``a``: the rest (dense weights,
    launches)."""

    routing: ExpertRouting
    a: float
    w: float
    c: float
    d: float

    FEATURES = ("a", "w", "c", "d")

    def features(self, tokens: np.ndarray, batch: np.ndarray | float) -> np.ndarray:
        return _features(self.routing, tokens, batch)

    def __call__(self, tokens: np.ndarray | float, batch: np.ndarray | float = 1) -> np.ndarray:
        return self.features(np.asarray(tokens, float), batch) @ self.coefficients

    @cached_property
    def coefficients(self) -> np.ndarray:
        return np.array([self.a, self.w, self.c, self.d])

    @classmethod
    def fit(cls, routing: ExpertRouting, tokens: np.ndarray, batch: np.ndarray, seconds: np.ndarray
            ) -> "ExpertCostModel":
        """Least squares in relative error (weights 1/T^2) with every coefficient >= 0."""
        x = _features(routing, np.asarray(tokens, float), np.asarray(batch, float))
        y = np.asarray(seconds, float)
        if y.size == 0:
            raise ValueError("cannot fit an expert cost model to no points")
        return cls(routing, *nonnegative_least_squares(x / y[:, None], np.ones_like(y)))


def _features(routing: ExpertRouting, tokens: np.ndarray, batch) -> np.ndarray:
    """``[..., 4]``: 1, touched / E, tokens, batch (filled in place: the planner calls this
    every step on thousands of counts)."""
    n = np.asarray(tokens, float)
    out = np.empty(n.shape + (4,))
    out[..., 0] = 1.0
    out[..., 1] = routing.touched(n) / routing.experts
    out[..., 2] = n
    out[..., 3] = batch
    return out


def nonnegative_least_squares(x: np.ndarray, y: np.ndarray) -> tuple[float, ...]:
    """argmin ||x @ beta - y|| subject to beta >= 0, for a few columns: the best of the
    unconstrained fits on every subset of columns whose solution is non-negative (exact:
    the optimum is the least-squares fit on its own support)."""
    cols = x.shape[1]
    best, best_err = np.zeros(cols), float(np.sum(y ** 2))
    for size in range(1, cols + 1):
        for subset in itertools.combinations(range(cols), size):
            beta, *_ = np.linalg.lstsq(x[:, subset], y, rcond=None)
            if np.any(beta < 0):
                continue
            err = float(np.sum((x[:, subset] @ beta - y) ** 2))
            if err < best_err - 1e-15 * max(best_err, 1e-300):
                best, best_err = np.zeros(cols), err
                best[list(subset)] = beta
    return tuple(float(v) for v in best)
