"""Step-latency profile ``T(n_tokens)`` of one model on one device, and its knee ``N*``.

A profile holds measured points (tokens, seconds), optionally tagged with the number of
requests (batch) that produced them. Two views of the same data:

- the **hinge fit** ``T(n) = max(t0, a + b*n)`` (flat, then linear): it names the knee
  ``N* = (t0 - a) / b`` and the slope used to extrapolate past the measured range;
- the **monotone interpolation** used by ``predict``: per batch, the medians of repeated
  points made non-decreasing in ``n`` and linearly interpolated, then interpolated in
  ``log(batch)``. Real curves are not exact hinges (and at equal tokens, many requests with
  long caches cost more than few), so the controller reads the interpolation.

A mixture-of-experts model's profile names its ``routing``: between and beyond measured points
its curves then follow the fitted :class:`~optimus.policy.elastic.experts.ExpertCostModel`
(cost by experts touched), scaled to pass through the measurements, instead of straight lines
in tokens and the hinge.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np

from optimus.policy.elastic.experts import ExpertCostModel, ExpertRouting

PROFILE_VERSION = 1


@dataclass(frozen=True)
class LatencyPoint:
    tokens: int  # tokens processed by the step
    seconds: float  # measured wall time of the step (median of repeats)
    batch: int | None = None  # requests in the step; None when unknown

    def __post_init__(self) -> None:
        if self.tokens < 1 or not self.seconds > 0 or (self.batch is not None and self.batch < 1):
            raise ValueError(f"invalid latency point {self}")


@dataclass(frozen=True)
class HingeFit:
    """``T(n) = max(t0, a + b*n)``; ``knee`` is where the two pieces meet (inf if b == 0)."""

    t0: float
    a: float
    b: float

    @property
    def knee(self) -> float:
        return (self.t0 - self.a) / self.b if self.b > 0 else math.inf

    def __call__(self, n: np.ndarray | float) -> np.ndarray | float:
        return np.maximum(self.t0, self.a + self.b * np.asarray(n, dtype=float))


def isotonic(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted pool-adjacent-violators: the closest non-decreasing sequence to ``y``."""
    vals, wts, sizes = [], [], []
    for yi, wi in zip(y.tolist(), w.tolist()):
        vals.append(yi), wts.append(wi), sizes.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            v2, w2, s2 = vals.pop(), wts.pop(), sizes.pop()
            wsum = wts[-1] + w2
            vals[-1] = (vals[-1] * wts[-1] + v2 * w2) / wsum
            wts[-1], sizes[-1] = wsum, sizes[-1] + s2
    return np.repeat(np.array(vals), sizes)


def fit_hinge(tokens: np.ndarray, seconds: np.ndarray) -> HingeFit:
    """Least-squares hinge in relative error (weights 1/T^2): a coarse log-spaced search
    over the knee, then a fine one around the best; (t0, b >= 0) solved in closed form."""
    n, y = np.asarray(tokens, float), np.asarray(seconds, float)
    if n.size == 0:
        raise ValueError("cannot fit a latency curve to no points")
    lo, hi = max(n.min(), 1.0), max(n.max(), 1.0)
    if hi <= lo:
        return HingeFit(float(np.median(y)), float(np.median(y)), 0.0)
    best = _best_knee(n, y, np.geomspace(lo, hi, 96))
    step = (hi / lo) ** (1 / 95)
    best = _best_knee(n, y, np.geomspace(max(lo, best[0] / step), min(hi, best[0] * step), 64))
    k, t0, b = best
    if b <= 0:
        return HingeFit(t0, t0, 0.0)
    return HingeFit(t0, t0 - b * k, b)


def _best_knee(n: np.ndarray, y: np.ndarray, knees: np.ndarray) -> tuple[float, float, float]:
    w = 1.0 / y ** 2
    best = (float(knees[0]), float(np.sum(w * y) / np.sum(w)), 0.0, math.inf)
    for k in knees:
        x = np.maximum(0.0, n - k)
        t0, b = _weighted_line(x, y, w)
        if b < 0:
            t0, b = float(np.sum(w * y) / np.sum(w)), 0.0
        sse = float(np.sum(w * (y - t0 - b * x) ** 2))
        if sse < best[3] - 1e-15:
            best = (float(k), t0, b, sse)
    return best[:3]


def _weighted_line(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    sw, sx, sy = w.sum(), (w * x).sum(), (w * y).sum()
    sxx, sxy = (w * x * x).sum(), (w * x * y).sum()
    det = sw * sxx - sx * sx
    if det <= 1e-18 * max(sw * sxx, 1e-300):
        return float(sy / sw), 0.0
    b = (sw * sxy - sx * sy) / det
    return float((sy - b * sx) / sw), float(b)


@dataclass(frozen=True)
class _Curve:
    """One monotone piecewise-linear curve: tokens ``x`` (strictly increasing), seconds ``y``."""

    x: np.ndarray
    y: np.ndarray

    @classmethod
    def from_points(cls, tokens: list[int], seconds: list[float]) -> "_Curve":
        by_n: dict[int, list[float]] = {}
        for n, s in zip(tokens, seconds):
            by_n.setdefault(n, []).append(s)
        xs = np.array(sorted(by_n), dtype=float)
        med = np.array([float(np.median(by_n[int(x)])) for x in xs])
        counts = np.array([len(by_n[int(x)]) for x in xs], dtype=float)
        return cls(xs, isotonic(med, counts))

    def __call__(self, n: np.ndarray, hinge: HingeFit) -> np.ndarray:
        """Interpolated inside the measured range, flat below it; above it the last point is
        scaled by the global hinge (a small batch's curve keeps flat until the global knee)."""
        out = np.interp(n, self.x, self.y)
        above = n > self.x[-1]
        if not above.any():
            return out
        return np.where(above, self.y[-1] * hinge(n) / hinge(self.x[-1]), out)

    def anchored(self, n: np.ndarray, shape_n: np.ndarray, ratio: np.ndarray) -> np.ndarray:
        """``shape_n`` (a model at ``n``) times ``ratio`` (:meth:`ratio`: the points over the
        model where they were measured), interpolated between them and held at the ends: exact
        at every point when the two shapes agree, and curved like the model between and beyond them."""
        return shape_n * np.interp(n, self.x, ratio)

    def ratio(self, shape_here: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        return self.y / np.maximum(shape_here(self.x), 1e-12)


@dataclass(frozen=True)
class LatencyProfile:
    points: tuple[LatencyPoint, ...]
    device: str = "unknown"
    model_id: str = "unknown"
    created: float = field(default_factory=time.time)
    # Cached positions per request in the measured steps: a re-check must time the same steps.
    context: int | None = None
    source: str = "unknown"  # what measured it ("optimus profile", "start-up", "synthetic"), for the logs
    routing: ExpertRouting | None = None  # a mixture-of-experts model's routing (None: dense)

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a latency profile needs at least one point")
        object.__setattr__(self, "points", tuple(self.points))

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def from_pairs(cls, pairs, **kw) -> "LatencyProfile":
        """From ``(tokens, seconds)`` or ``(tokens, seconds, batch)`` tuples."""
        return cls(tuple(LatencyPoint(int(p[0]), float(p[1]), *(p[2:3] or (None,))) for p in pairs), **kw)

    @classmethod
    def synthetic(cls, t0: float, knee: float, slope: float, max_tokens: int | None = None) -> "LatencyProfile":
        """The exact hinge ``T(n) = t0 + slope * max(0, n - knee)`` sampled at powers of two
        and at the knee itself (so the interpolation reproduces the kink exactly)."""
        if t0 <= 0 or knee < 1 or slope < 0:
            raise ValueError("synthetic profile needs t0 > 0, knee >= 1, slope >= 0")
        top = max_tokens or int(2 ** math.ceil(math.log2(knee * 32)))
        ns = sorted({2 ** k for k in range(int(math.log2(top)) + 1)} | {int(round(knee))})
        pairs = [(n, t0 + slope * max(0.0, n - knee)) for n in ns]
        return cls.from_pairs(pairs, device="synthetic", model_id="synthetic", source="synthetic")

    # ---- the two views -----------------------------------------------------------------
    @cached_property
    def fit(self) -> HingeFit:
        return fit_hinge(np.array([p.tokens for p in self.points]), np.array([p.seconds for p in self.points]))

    @property
    def knee(self) -> float:
        return self.fit.knee

    @cached_property
    def cost_model(self) -> ExpertCostModel | None:
        """The experts-touched model fitted to every point (None for a dense model)."""
        if self.routing is None:
            return None
        pts = self.points
        return ExpertCostModel.fit(self.routing, np.array([p.tokens for p in pts]),
                                   np.array([p.batch or 1 for p in pts]), np.array([p.seconds for p in pts]))

    @cached_property
    def _pooled(self) -> _Curve:
        return _Curve.from_points([p.tokens for p in self.points], [p.seconds for p in self.points])

    @cached_property
    def _by_batch(self) -> dict[int, _Curve]:
        """One curve per batch when every point names its batch and there are several."""
        batches = {p.batch for p in self.points}
        if None in batches or len(batches) == 1:
            return {}
        return {b: _Curve.from_points([p.tokens for p in self.points if p.batch == b],
                                      [p.seconds for p in self.points if p.batch == b]) for b in sorted(batches)}

    def predict(self, n: float, batch: int | None = None) -> float:
        return float(self.predict_many(np.array([float(n)]), batch)[0])

    def predict_many(self, n: np.ndarray, batch: int | np.ndarray | None = None) -> np.ndarray:
        """Predicted seconds for step token counts ``n`` [K] with ``batch`` requests: the
        per-batch curves interpolated in log(batch) (clamped to the grid), else the pooled one.
        ``batch`` may also be an array like ``n``: each count with its own batch."""
        n = np.maximum(np.asarray(n, dtype=float), 1.0)
        if isinstance(batch, np.ndarray):
            return self._predict_batches(n, batch)
        curves = self._by_batch
        if not curves or batch is None:
            return self._along(self._pooled, n, 1, self._shape(n, batch or 1))
        shape = self._shape(n, batch)  # one model evaluation, shared by the curves blended
        grid = list(curves)
        if batch <= grid[0] or batch >= grid[-1]:
            end = grid[0] if batch <= grid[0] else grid[-1]
            return self._along(curves[end], n, end, shape)
        hi = next(b for b in grid if b >= batch)
        lo = grid[grid.index(hi) - 1]
        w = (math.log(batch) - math.log(lo)) / (math.log(hi) - math.log(lo))
        return (1 - w) * self._along(curves[lo], n, lo, shape) + w * self._along(curves[hi], n, hi, shape)

    def _predict_batches(self, n: np.ndarray, batch: np.ndarray) -> np.ndarray:
        """``predict_many`` with a batch per count along ``n``'s last axis (``batch`` [W], ``n``
        [W] or [G, W]): each grid curve is read once, on the columns that blend it (a latency
        refit asks for a grid of stretches over a window of steps of dozens of batches), an
        experts model at each column's own batch."""
        curves = self._by_batch
        if not curves:
            if self.cost_model is None:
                return self._along(self._pooled, n, 1, None)
            return self._along(self._pooled, n, 1, self.cost_model(n, batch.astype(float)))
        out = np.zeros_like(n)
        grid = np.array(list(curves), dtype=float)
        b = batch.astype(float)
        hi = np.minimum(np.searchsorted(grid, b), len(grid) - 1)  # the first grid batch >= b
        lo = np.maximum(hi - 1, 0)
        ends = (b <= grid[0]) | (b >= grid[-1])  # clamped: the end curve alone
        lo[ends] = hi[ends] = np.where(b[ends] <= grid[0], 0, len(grid) - 1)
        inside = hi > lo
        w = np.ones_like(b)
        w[inside] = np.log(b[inside] / grid[lo[inside]]) / np.log(grid[hi[inside]] / grid[lo[inside]])
        model = self.cost_model
        for g, (at, curve) in enumerate(curves.items()):
            cols = np.flatnonzero((hi == g) | ((lo == g) & inside))
            if cols.size:
                coef = np.where(hi[cols] == g, w[cols], 1.0 - w[cols])
                part = n[..., cols]
                # MoE: the experts model at each column's own batch, as predict_many reads it
                shape = None if model is None else model(part, b[cols])
                out[..., cols] += coef * self._along(curve, part, at, shape)
        return out

    def _shape(self, n: np.ndarray, batch: int) -> np.ndarray | None:
        """The experts-touched model at ``n`` tokens of ``batch`` requests (None: dense)."""
        model = self.cost_model
        return None if model is None else model(n, batch)

    def _along(self, curve: _Curve, n: np.ndarray, measured_at: int, shape: np.ndarray | None) -> np.ndarray:
        """The curve measured at ``measured_at`` requests, read at ``n`` tokens. MoE (``shape``:
        :meth:`_shape` at ``n`` and the step's batch): the model times the curve's ratio to the
        model (so blending two curves blends ratios, and a batch off the grid follows the
        model). Dense (``shape`` None): straight between points, the hinge above them."""
        if shape is None:
            return curve(n, self.fit)
        return curve.anchored(n, shape, self._ratio(curve, measured_at))

    @cached_property
    def _ratios(self) -> dict[tuple[int, int], np.ndarray]:
        return {}  # (id of a curve of this profile, measured_at) -> its ratio to the experts model

    def _ratio(self, curve: _Curve, measured_at: int) -> np.ndarray:
        """The curve's points over the experts model where they were measured: fixed for the
        profile's life (its curves are its own cached properties, so their ids stay theirs)."""
        key = (id(curve), measured_at)
        ratio = self._ratios.get(key)
        if ratio is None:
            model = self.cost_model
            ratio = self._ratios[key] = curve.ratio(lambda x: model(x, measured_at))
        return ratio

    # ---- measured cells ----------------------------------------------------------------
    def cells(self) -> list[tuple[int, int]]:
        """The (batch, chunk) steps measured, fewest tokens first (batch 1 where unrecorded)."""
        found = {(p.batch or 1, p.tokens // (p.batch or 1)) for p in self.points}
        return sorted(found, key=lambda bc: (bc[0] * bc[1], bc))

    def measured(self, batch: int, chunk: int) -> float | None:
        """Median measured seconds of the step ``batch x chunk``; None if it was not measured."""
        times = [p.seconds for p in self.points if (p.batch or 1) == batch and p.tokens == batch * chunk]
        return float(np.median(times)) if times else None

    def describe(self) -> str:
        """One line for the logs: who measured it, when, where, and the curve it found."""
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.created)) if self.created else "at an unknown time"
        knee = "no knee" if math.isinf(self.knee) else f"knee {self.knee:.0f} tokens"
        by = "" if self.source == "unknown" else f" by {self.source}"
        shape = f"{self.fit.t0 * 1e3:.2f} ms flat, {knee}" if self.cost_model is None else self.describe_experts()
        return f"measured {when}{by} on {self.device}, {len(self.points)} points, {shape}"

    def describe_experts(self) -> str:
        """The fitted experts-touched model in words (MoE profiles)."""
        m = self.cost_model
        return (f"{m.a * 1e3:.2f} ms + {m.w * 1e3:.2f} ms for all {self.routing.experts} experts "
                f"(top-{self.routing.top_k}) + {m.c * 1e6:.2f} us/token + {m.d * 1e6:.2f} us/request")

    # ---- persistence -------------------------------------------------------------------
    def to_json(self) -> dict:
        fit = self.fit
        return {
            "version": PROFILE_VERSION, "device": self.device, "model_id": self.model_id, "created": self.created,
            "context": self.context, "source": self.source,
            "routing": None if self.routing is None else self.routing.to_json(),
            "fit": {"t0": fit.t0, "a": fit.a, "b": fit.b, "knee": None if math.isinf(fit.knee) else fit.knee},
            "points": [{"tokens": p.tokens, "seconds": p.seconds, "batch": p.batch} for p in self.points],
        }

    @classmethod
    def from_json(cls, data: dict) -> "LatencyProfile":
        if data.get("version") != PROFILE_VERSION:
            raise ValueError(f"latency profile version {data.get('version')!r} is not {PROFILE_VERSION}; re-run "
                             "'optimus profile'")
        points = tuple(LatencyPoint(int(p["tokens"]), float(p["seconds"]), p.get("batch")) for p in data["points"])
        context = data.get("context")
        return cls(points, device=data.get("device", "unknown"), model_id=data.get("model_id", "unknown"),
                   created=float(data.get("created", 0.0)), context=None if context is None else int(context),
                   source=data.get("source", "unknown"), routing=ExpertRouting.from_json(data.get("routing")))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(path)  # atomic: a reader never sees half a profile
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyProfile":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"latency profile {path} is not valid JSON: {exc}") from None
        return cls.from_json(data)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "x"


def cache_dir() -> Path:
    root = os.environ.get("OPTIMUS_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "optimus"


def default_profile_path(device_name: str, model_id: str) -> Path:
    """``<cache>/profiles/<device>__<model>-<hash>.json``; the hash of the full pair keeps two
    models whose names slug alike apart."""
    digest = hashlib.sha1(f"{device_name}\0{model_id}".encode()).hexdigest()[:10]
    name = f"{_slug(device_name)}__{_slug(os.path.basename(model_id.rstrip('/')) or model_id)}-{digest}.json"
    return cache_dir() / "profiles" / name
