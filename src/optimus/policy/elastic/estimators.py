"""The slowly-moving estimates the elastic controller decides from.

- :class:`TauEstimator`: tokens committed per step ``tau(C)`` for each chunk size, a decayed
  running mean seeded by a prior, made monotone non-decreasing in ``C`` and kept in ``[1, C]``.
- :class:`LatencyCorrector`: scales of the profiled curve's flat part and slope and a stretch
  of its token axis, learned from measured step latencies.
- :class:`TokenLoad`: the step tokens the policy does not size (mean and unexplained spread).
- :func:`expected_latency`: a step's expected time when its rows scatter around their mean.

Each moves by bounded amounts per step; that is what lets the controller's decisions settle.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from optimus.policy.elastic.latency import isotonic


def default_tau_prior(c: int) -> float:
    """Optimistic concave prior ``C**0.6`` (1, 1.5, 2.3, 3.5, 5.3, 8, 12): optimistic so that an
    untried size is tried rather than starved; overwritten as soon as the size is observed."""
    return float(c) ** 0.6


class TauEstimator:
    """Per chunk size ``C``: a decayed weighted mean of commits per step. A step in which ``C``
    ran does ``S = g*S + sum(w*k)``, ``W = g*W + sum(w)`` (``g = decay``); the prior enters as
    ``prior_weight`` permanent pseudo-observations. A size that does not run keeps its
    estimate in the short run, but its evidence fades by ``idle_decay`` per step, so a curve
    that once collapsed (say to 1 under a burst of hesitant requests) returns to the prior
    over a few hundred steps and large chunks get tried again.

    Observations are a request's commits rescaled to the shared curve (``1 + (k - 1) / L``,
    weight ``L``, for a request at confidence ``L``; see :class:`RequestConfidence`): the
    weighted mean is then ``1 + sum(k - 1) / sum(L)``, the rank-one factor model in which
    hesitant requests barely move the curve the confident ones define.

    ``adapt_prior``: a prior that promises more than the model delivers keeps its shape but
    not its level. Its excess ``t(C) - 1`` is scaled by ``f <= 1``, the observed excess over
    the excess the prior predicted for the same observations (all sizes pooled, by weight). A
    prior from another regime (say 12 commits at C = 32 where the model commits 2.5) is then
    corrected at the sizes never run as well as at the ones run: without it, an untried size
    keeps its old promise, pools with the sizes next to it and draws the planner to it, and
    the sizes are unlearned one at a time. A prior that promises less keeps its level: untried
    sizes stay as tempting as the prior made them, and get tried."""

    def __init__(self, sizes: tuple[int, ...], prior: dict[int, float] | None = None,
                 prior_weight: float = 8.0, decay: float = 0.98, idle_decay: float = 0.998,
                 adapt_prior: bool = False) -> None:
        if not 0.0 < decay <= 1.0 or not 0.0 < idle_decay <= 1.0 or prior_weight <= 0:
            raise ValueError("tau estimator needs decay and idle_decay in (0, 1] and prior_weight > 0")
        self.decay, self.idle_decay, self.adapt_prior = decay, idle_decay, adapt_prior
        prior = dict(prior) if prior else {c: default_tau_prior(c) for c in sizes}
        prior.setdefault(1, 1.0)
        self._prior = {int(c): (prior_weight * float(t), prior_weight) for c, t in prior.items()}
        self._data = {c: (0.0, 0.0) for c in self._prior}  # size -> (S, W) of observations
        self._table: tuple[np.ndarray, np.ndarray] | None = None
        self._prior_cache: tuple[list[int], np.ndarray, np.ndarray, np.ndarray] | None = None

    def observe(self, chunk_sizes, committed, weights=None) -> None:
        """``committed``: commits per request (floats allowed); ``weights``: per request (default 1)."""
        sizes = np.asarray(chunk_sizes, dtype=np.int64)
        w = np.ones(sizes.size) if weights is None else np.asarray(weights, dtype=float)
        used = (sizes >= 1) & (w > 0)
        sizes, w = sizes[used], w[used]
        commits = np.minimum(np.asarray(committed, dtype=float)[used], sizes)
        sums, counts = np.bincount(sizes, w * commits), np.bincount(sizes, w)
        step = {c: (float(sums[c]), float(counts[c])) for c in np.flatnonzero(counts).tolist()}
        for c in set(self._data) | set(step):
            s, n = self._data.get(c, (0.0, 0.0))
            if c in step:
                self._data[c] = (self.decay * s + step[c][0], self.decay * n + step[c][1])
            elif n > 0:
                self._data[c] = (self.idle_decay * s, self.idle_decay * n)
        self._table = None

    @property
    def table(self) -> tuple[np.ndarray, np.ndarray]:
        """Sizes [K] ascending and their monotone estimates [K], each in [1, size]."""
        if self._table is None:
            keys, sizes, prior_w, prior_t = self._prior_table()
            data_s, data_w = np.array([self._data[c] for c in keys]).T
            if self.adapt_prior:
                prior_t = 1.0 + self.prior_scale() * (prior_t - 1.0)
            sums, weights = prior_w * prior_t + data_s, prior_w + data_w
            means = np.where(weights > 0, sums / np.maximum(weights, 1e-12), 1.0)
            # A pooled value never exceeds the smallest size of its pool, so [1, C] still holds.
            self._table = sizes, isotonic(np.clip(means, 1.0, sizes), np.maximum(weights, 1e-12))
        return self._table

    def _prior_table(self) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
        """Sizes known (ascending, as ints and floats) and the prior's weight and mean at each:
        they change only when a new size is observed, so they are kept until then."""
        keys = sorted(self._data)
        if self._prior_cache is None or self._prior_cache[0] != keys:
            prior_w = np.array([self._prior.get(c, (0.0, 0.0))[1] for c in keys])
            prior_t = np.array([self._prior[c][0] / self._prior[c][1] if prior_w[i] > 0 else 1.0
                                for i, c in enumerate(keys)])
            self._prior_cache = keys, np.array(keys, dtype=float), prior_w, prior_t
        return self._prior_cache

    def prior_scale(self) -> float:
        """``f``: observed excess commits over the prior's excess at the same observations
        (1 without evidence), at most 1: the correction only ever lowers the prior."""
        seen = predicted = 0.0
        for c, (s, w) in self._data.items():
            if c > 1 and w > 0 and c in self._prior:
                p_s, p_w = self._prior[c]
                seen += s - w
                predicted += w * (p_s / p_w - 1.0)
        if predicted <= 1e-9:
            return 1.0
        # Pseudo-evidence of one prior-weight at f = 1 keeps a first observation from deciding.
        w0 = max(p_w for _, p_w in self._prior.values())
        return float(min(1.0, max(0.0, (seen + w0) / (predicted + w0))))

    def __call__(self, c: np.ndarray | int) -> np.ndarray:
        """tau for any sizes: linear between known sizes, flat beyond them, capped at C."""
        sizes, taus = self.table
        c = np.asarray(c, dtype=float)
        return np.clip(np.interp(c, sizes, taus), 1.0, np.maximum(c, 1.0))

    def snapshot(self) -> dict[int, float]:
        sizes, taus = self.table
        return {int(c): float(t) for c, t in zip(sizes, taus)}


# (token counts [K] or [G, K], batch: one, or one per column [K]) -> seconds, shaped as the counts
Predict = Callable[[np.ndarray, "int | np.ndarray"], np.ndarray]


class LatencyCorrector:
    """The profile corrected by a scale ``s`` of its flat part, a scale ``r`` of what it adds
    past its knee ``K`` and a stretch ``k`` of its token axis. With ``x = n / k``:
    ``T(n) = s * P(min(x, K)) + r * (P(x) - P(min(x, K)))``. On a hinge (flat ``t0`` to ``K``,
    then slope ``b``) the device's flat level, knee and slope are ``s t0``, ``k K`` and
    ``r b / k``: all three free, so a profile measured on another card, with other cache lengths
    or on a busier device is matched whichever of them moved. ``r = s`` (the whole curve
    scaled) unless the steps demand otherwise (:meth:`_refit`).

    The fit holds over the token counts its window measured, ``[lo, hi]``. Past them the curve
    continues from the fitted value at the edge as the profile does, stretched or not,
    whichever grows less (``T(hi) min(P(n / k) / P(hi / k), P(n) / P(hi))`` above ``hi``,
    likewise below ``lo``): what no step measured is planned optimistically, so the controller
    goes and measures it, and the fit then covers it. Two step sizes (one request: its window,
    and its window plus a stored block) fit a knee between them; that knee carried to steps
    four times larger predicted them at three times their time (an H100, SDAR-8B shape).

    Fitted to the last ``window`` measured steps every ``refit_every`` steps: a grid search
    over ``log k`` (a local gradient is zero on the flat part, so it could never find a knee
    that sits elsewhere), ``s`` and ``r`` in closed form per ``k``. The stretch moves when the
    data refute it, at once to the nearest stretch they do not refute (steps of one size can
    explore it tenfold, and a quarter per refit then spent a whole load planning on that), and
    explores by ``max_step`` per refit: noise within ``tie_sigmas`` cannot move it.
    """

    def __init__(self, knee: float, window: int = 256, refit_every: int = 16, min_points: int = 32,
                 max_log: float = math.log(16.0), max_step: float = math.log(1.25), grid: int = 129,
                 tie_sigmas: float = 4.0) -> None:
        if window < min_points or refit_every < 1:
            raise ValueError("latency correction needs window >= min_points and refit_every >= 1")
        self.tie_sigmas = tie_sigmas
        self.knee = knee  # the profile's knee in tokens (inf: none)
        self._floor, self._ceiling = -max_log, max_log  # exploration stays inside: refuted lately
        self.window, self.refit_every, self.min_points = window, refit_every, min_points
        self.max_step = max_step
        self.grid = np.linspace(-max_log, max_log, grid)
        self.log_scale = 0.0
        self.slope_ratio = 1.0  # r / s: 1 scales the whole curve alike
        self.free_slope = False  # r fitted apart from s (the data demanded it at the last refit)
        self.log_stretch = 0.0
        self.measured = (0.0, math.inf)  # token counts the last refit's window spans (before one: all)
        self._points: list[tuple[float, int, float]] = []  # (tokens, batch, log seconds)
        self._since_fit = 0

    @property
    def scale(self) -> float:
        return math.exp(self.log_scale)

    @property
    def stretch(self) -> float:
        return math.exp(self.log_stretch)

    def __call__(self, predict: Predict, n: np.ndarray, batch: int) -> np.ndarray:
        """Corrected latency at token counts ``n`` [K] with ``batch`` requests."""
        n = np.asarray(n, dtype=float)
        k = self.stretch
        if (self.slope_ratio == 1.0 and k == 1.0) or not n.size:
            return self.scale * predict(n, batch)  # the profile scaled: nothing to extrapolate
        edge = np.clip(n, *self.measured)  # = n where steps were measured
        flat, full, own, edge_p, own_p = np.split(
            predict(np.concatenate([np.minimum(edge / k, self.knee), edge / k, n / k, edge, n]), batch), 5)
        fitted = self.scale * (flat + self.slope_ratio * (full - flat))
        return fitted * np.minimum(own / np.maximum(full, 1e-12), own_p / np.maximum(edge_p, 1e-12))

    def observe(self, predict: Predict, n: int, batch: int, measured_s: float) -> None:
        if not measured_s > 0:
            return
        self._points.append((float(max(n, 1)), int(batch), math.log(measured_s)))
        del self._points[:-self.window]
        self._since_fit += 1
        if self._since_fit >= self.refit_every and len(self._points) >= self.min_points:
            self._since_fit = 0
            self._refit(predict)

    def _refit(self, predict: Predict) -> None:
        n = np.array([p[0] for p in self._points])
        batch = np.array([p[1] for p in self._points])
        log_t = np.array([p[2] for p in self._points])
        # Steps repeat their (tokens, batch): graph buckets, steady loads. The profile is read
        # once per distinct pair over the grid of stretches, then spread to the window's steps.
        pairs, spread = np.unique(np.stack([n, batch]), axis=1, return_inverse=True)
        parts = self._parts(predict, pairs[0][None, :] / np.exp(self.grid)[:, None], pairs[1].astype(batch.dtype))
        parts = tuple(part[:, spread.reshape(-1)] for part in parts)  # [G, W] each
        whole, free = self._fit(parts, log_t, free_slope=False), self._fit(parts, log_t, free_slope=True)
        # The slope is freed only when the data demand it: the whole-curve scale misses them by
        # more than a tie (else the extra freedom would let any knee fit flat data, slope 0).
        var = max(float(free[2].min()), 1e-6)
        self.free_slope = len(n) * (whole[2].min() - free[2].min()) > self.tie_sigmas ** 2 * var
        sse = (free if self.free_slope else whole)[2]
        # Stretches the data cannot tell from the best fit (total squared error within
        # ``tie_sigmas**2`` residual variances of it) tie.
        var = max(float(sse.min()), 1e-6)
        ties = self.grid[len(n) * (sse - sse.min()) <= self.tie_sigmas ** 2 * var]
        self.log_stretch += self._step(float(ties.min()), float(ties.max()), n)
        s, ratio, _ = self._fit(self._parts(predict, n[None, :] / self.stretch, batch), log_t, self.free_slope)
        self.log_scale, self.slope_ratio = math.log(float(s[0])), float(ratio[0])
        self.measured = (float(n.min()), float(n.max()))

    def _parts(self, predict: Predict, x: np.ndarray, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The profile at stretched token counts ``x`` [G, W] split at its knee: the flat part
        ``P(min(x, K))`` and the excess past it, each [G, W]."""
        both = np.maximum(predict(np.concatenate([np.minimum(x, self.knee), x]), batch), 1e-12)  # [2G, W]
        flat, full = both[:len(x)], both[len(x):]
        return flat, np.maximum(full - flat, 0.0)

    @staticmethod
    def _fit(parts: tuple[np.ndarray, np.ndarray], log_t: np.ndarray,
             free_slope: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per grid row [G]: ``s``, ``r / s`` and the mean squared log error against ``log_t``
        [W]. The whole curve scaled: ``r = s``, least squares on ``log T``. A free slope:
        least squares on the relative error, ``r >= 0`` (a tiny ridge keeps ``r = s`` where
        no step passes the knee)."""
        flat, excess = parts
        if not free_slope:
            log_pred = np.log(flat + excess)
            log_s = (log_t[None, :] - log_pred).mean(axis=1)
            return np.exp(log_s), np.ones_like(log_s), ((log_t[None, :] - log_pred - log_s[:, None]) ** 2).mean(axis=1)
        t = np.exp(log_t)
        a, c = flat / t, excess / t  # relative: each step weighs alike whatever its latency
        ridge = 1e-6
        aa, ac, cc = (a * a).sum(1) + ridge, (a * c).sum(1) - ridge, (c * c).sum(1) + ridge
        ya, yc = a.sum(1), c.sum(1)
        det = aa * cc - ac * ac
        s, r = (cc * ya - ac * yc) / det, (aa * yc - ac * ya) / det
        s = np.maximum(np.where(r < 0, ya / (a * a).sum(1), s), 1e-9)  # no negative slope: s alone, r = 0
        r = np.maximum(r, 0.0)
        log_pred = np.log(np.maximum(s[:, None] * flat + r[:, None] * excess, 1e-12))
        return s, r / s, ((log_t[None, :] - log_pred) ** 2).mean(axis=1)

    def _step(self, lo: float, hi: float, n: np.ndarray) -> float:
        """Move of ``log k`` given the tied range ``[lo, hi]`` and the window's token counts.

        Refuted (outside the range): move to its nearest edge. Fitting, pinned on one side,
        open on the other, and the steps reach the modelled knee: flat data there say only
        that the real knee is at least here, sloped data only that it is at most here (a line
        through the origin fits any nearer knee), and the only way to find it is to go and
        look: explore one ``max_step`` to the open side. Otherwise stay: noise inside the range
        moves nothing. A refuted stretch bounds later explorations (the bounds relax slowly),
        so exploring cannot become a cycle.
        """
        cur, tol, big = self.log_stretch, self.grid[1] - self.grid[0], self.max_step
        relax = big / 1024  # a refuted exploration may be retried after ~1000 refits
        self._floor, self._ceiling = self._floor - relax, self._ceiling + relax
        if cur < lo - tol / 2:
            self._floor = max(self._floor, cur)  # cur and below are refuted
            return lo - cur
        if cur > hi + tol / 2:
            self._ceiling = min(self._ceiling, cur)  # cur and above are refuted
            return hi - cur
        if len(n) < self.window:
            return 0.0  # explore only on a full window: the tie range is reliable then
        knee = self.knee * self.stretch
        flat_only, sloped_only = n.max() <= knee, n.min() >= knee  # nothing bounds the knee on one side
        if (cur - lo < big or flat_only) and hi - cur >= big and n.max() >= 0.8 * knee and cur + big < self._ceiling:
            return big
        if (hi - cur < big or sloped_only) and cur - lo >= big and n.min() <= 1.25 * knee and cur - big > self._floor:
            return -big
        return 0.0


class TokenLoad:
    """Rows per step beyond the chunk and store rows of the requests the policy sizes
    (prefill pieces, pinned requests), modelled as a number of rows *per committed token*:
    every answer token brings its share of prompt to prefill, so this load grows with the
    commit rate rather than staying fixed per step. Also the variance of the step's rows that
    the store model does not explain. EWMAs with rate ``rate``, of residuals clipped to ``clip``
    standard deviations (at least ``min_sd`` rows): one step that admits a whole batch of
    prompts (thousands of rows) would otherwise raise the load and price every step near the
    knee as lumpy for a hundred steps after it; lumps that recur widen the clip as they come."""

    def __init__(self, rate: float = 0.05, clip: float = 16.0, min_sd: float = 32.0) -> None:
        if not 0.0 < rate <= 1.0:
            raise ValueError("token load rate must be in (0, 1]")
        self.rate, self.clip, self.min_sd = rate, clip, min_sd
        self._rows = 0.0  # mean extra rows per step
        self._commits = 0.0  # mean committed tokens per step (all decoding requests)
        self._var = 0.0  # of the extra rows
        self._model_var = 0.0  # the part of it the store model predicts
        self.largest = math.inf  # rows of the largest step seen (none yet: unbounded)

    @property
    def per_commit(self) -> float:
        return max(0.0, self._rows) / max(self._commits, 1.0)

    @property
    def extra_var(self) -> float:
        return max(0.0, self._var - self._model_var)

    def observe(self, num_tokens: int, own_rows: float, own_var: float, committed: int) -> None:
        self.largest = num_tokens if math.isinf(self.largest) else max(self.largest, num_tokens)
        bound = self.clip * math.sqrt(max(self._var, self.min_sd * self.min_sd))
        residual = min(max((num_tokens - own_rows) - self._rows, -bound), bound)  # store lumps average out
        self._rows += self.rate * residual
        self._commits += self.rate * (committed - self._commits)
        self._var += self.rate * (residual * residual - self._var)
        self._model_var += self.rate * (own_var - self._model_var)


def expected_latency(latency, floor: np.ndarray, lumps: list[tuple[np.ndarray, np.ndarray]],
                     ceiling: float = math.inf) -> np.ndarray:
    """E[T(N)] for steps of ``floor`` [K] rows plus independent ``lumps``, each a (mean,
    variance) pair of [K] arrays: steps whose rows scatter around a knee (or a graph bucket's
    edge) cost more than the curve at their mean.

    The floor is what the step always runs (its chunk rows, the stores of size-1 requests).
    Each lump is modelled by three points that match its mean and variance (:func:`_lump_law`)
    and never go below zero. The lumps stay apart because their shapes differ: 64 requests'
    stores at C = 4 add about 97 +- 16 rows to every step, while a burst of prompts behind them
    (prefill load of sd 1,200 rows just after 64 requests arrive) is almost never there and
    huge when it is. One two-point law for both put 99% of the steps on the bare floor (256
    rows, the 256-row graph) while every such step ran 330-415 rows on the 512-row graph:
    elastic priced C = 4 at 11-13 ms where the H100 took 14 (SDAR-8B, 64 requests, regime
    real-8b), and held C = 4 at 0.83 of ar.

    No step runs more than ``ceiling`` rows (the largest the engine ran): a rare lump is at
    most the room above the floor, and comes more often instead. Unbounded, a lump's expected
    cost grows with the square of its mean (``q ~ mu^2 / var``): while four steps of 4,096
    prompt rows still weighed on the load (sd 4,300 rows), plans that commit more paid for
    lumps of 8,000-12,000 rows, and elastic kept 256 LLaDA2.0-mini requests at C = 1 for 70
    steps where C = 4 and 8 were 5-15% faster (CPU replay of the H100's steps)."""
    floor = np.maximum(np.asarray(floor, dtype=float), 1.0)
    points, weights = [floor], [np.ones_like(floor)]
    room = np.maximum(ceiling - floor, 0.0)
    for mean, var in lumps:
        law = _lump_law(np.broadcast_to(np.asarray(mean, dtype=float), floor.shape), np.asarray(var, dtype=float), room)
        points = [p + x for x, _ in law for p in points]
        weights = [w * q for _, q in law for w in weights]
    # Most points carry no weight (a two-point lump's third, an absent lump's): only the
    # others are read off the curve, a host cost every plan pays.
    x, w = np.concatenate(points), np.concatenate(weights)
    live = w > 0
    return np.bincount(np.nonzero(live)[0] % len(floor), weights=w[live] * latency(x[live]), minlength=len(floor))


def _lump_law(mean: np.ndarray, var: np.ndarray, room: np.ndarray | float = math.inf) -> list[tuple[np.ndarray, np.ndarray]]:
    """Three (rows, probability) points [K] with this mean and variance, all >= 0. Where the
    spread is under the mean (a sum of many small lumps, near normal): 3-point Gauss-Hermite,
    ``mu`` and ``mu +- sqrt(3 var)`` at 2/3, 1/6, 1/6, the low point clipped at zero. Where it
    is larger (one lump, rarely there: a chunk of 32 stored whole, a batch of prompts): 0 or
    ``a = mu + var / mu`` with probability ``q = mu / a``, ``a`` at most ``room`` (but never
    under ``mu``: the mean is kept, the variance gives); a symmetric law would put mass under
    zero, on the flat part of the curve, and charge small steps near a knee for a convexity
    their rows never reach."""
    mu, var = np.maximum(mean, 0.0), np.maximum(var, 0.0)
    lumpy = mu > 1e-9
    a = np.where(lumpy, np.minimum(mu + var / np.where(lumpy, mu, 1.0), np.maximum(room, mu)), 0.0)
    q = np.where(lumpy, mu / np.where(lumpy, a, 1.0), 0.0)
    near_normal = var < mu * mu
    h = np.sqrt(3.0 * var)
    return [(np.where(near_normal, mu, 0.0), np.where(near_normal, 2.0 / 3.0, 1.0 - q)),
            (np.where(near_normal, np.maximum(mu - h, 0.0), a), np.where(near_normal, 1.0 / 6.0, q)),
            (np.where(near_normal, mu + h, a), np.where(near_normal, 1.0 / 6.0, 0.0))]
