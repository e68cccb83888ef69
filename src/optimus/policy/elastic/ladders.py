"""The greedy allocation's structures: per request, the ladder of chunk sizes on the upper
concave hull of (cost, tau), and all requests' upgrades merged in order of falling marginal
efficiency (the rungs). A pure function of the estimates, rebuilt when they move."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Ladder:
    """The sizes on the upper concave hull of (cost, tau) for one planning cap: climbing it
    one rung at a time is the greedy's order, with strictly falling marginal efficiency."""

    sizes: np.ndarray  # [L] ascending, sizes[0] == 1
    taus: np.ndarray  # [L]
    costs: np.ndarray  # [L]
    variances: np.ndarray  # [L] variance of the request's rows per step (store lumps)
    # [L-1, 7] per rung (step from size j to j+1): size j+1, d tau, d cost, d variance,
    # d positions, efficiency d tau / d cost, size j
    rungs: np.ndarray


def build_ladder(cap: int, chunk_sizes: tuple[int, ...], tau, rows_per_commit: float) -> Ladder:
    """``tau``: sizes [K] -> expected commits per step [K] (the request's own curve)."""
    sizes = np.array(sorted({c for c in chunk_sizes if c <= cap} | {1, cap}), dtype=float)
    taus = tau(sizes)
    costs = sizes + rows_per_commit * taus
    variances = store_variance(sizes, taus)
    hull = [0]
    for j in range(1, len(sizes)):
        if taus[j] <= taus[hull[-1]]:
            continue  # no gain in commits: never worth its rows
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            slope_ab = (taus[b] - taus[a]) / (costs[b] - costs[a])
            slope_aj = (taus[j] - taus[a]) / (costs[j] - costs[a])
            if slope_aj < slope_ab:
                break
            hull.pop()  # b lies on or under the chord a-j
        hull.append(j)
    idx = np.array(hull)
    sizes, taus, costs, variances = sizes[idx], taus[idx], costs[idx], variances[idx]
    dtau, dcost = np.diff(taus), np.diff(costs)
    rungs = np.stack([sizes[1:], dtau, dcost, np.diff(variances), np.diff(sizes), dtau / dcost, sizes[:-1]], 1)
    return Ladder(sizes, taus, costs, variances, rungs)


def store_variance(sizes: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """A chunk of C lasting C/tau steps is stored (C rows) in a given step with probability
    tau/C: the rows it adds per step have variance C^2 p (1-p) = tau (C - tau)."""
    return taus * (sizes - taus)


@dataclass(frozen=True)
class Rungs:
    """All upgrades of all elastic requests in greedy order. Index m of the cumulative arrays
    is the allocation that applied the first m upgrades (m = 0: everyone at size 1)."""

    request: np.ndarray  # [U] index into the elastic requests
    size: np.ndarray  # [U] size the request moves up to
    size_before: np.ndarray  # [U] size it moves up from
    gain: np.ndarray  # [U+1] cumulative extra committed tokens per step
    cost: np.ndarray  # [U+1] cumulative amortised tokens
    var: np.ndarray  # [U+1] cumulative variance of the step's rows
    positions: np.ndarray  # [U+1] cumulative planned chunk positions

    def actual(self, max_chunk: np.ndarray) -> np.ndarray:
        """[U+1] cumulative chunk positions after clipping each request to ``max_chunk`` [R]."""
        cap = max_chunk[self.request]
        out = np.zeros(len(self.request) + 1)
        np.cumsum(np.minimum(self.size, cap) - np.minimum(self.size_before, cap), out=out[1:])
        return out


def merge_rungs(ladders: dict, keys: list) -> Rungs:
    """``keys[i]``: the key in ``ladders`` of elastic request i's ladder."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    owners, rungs, group_sizes = [], [], []
    for key, members in groups.items():
        lad = ladders[key]
        if len(lad.sizes) < 2:
            continue
        group_sizes.append(len(members))
        owners.append(np.repeat(members, len(lad.rungs)))  # member-major: [G * (L-1)]
        rungs.append(np.tile(lad.rungs, (len(members), 1)))
    if not rungs:
        zero = np.zeros(1)
        return Rungs(np.zeros(0, dtype=int), np.zeros(0), np.zeros(0), zero, zero, zero, zero)
    req, table = np.concatenate(owners), np.concatenate(rungs)
    if len(rungs) == 1:
        # One ladder (one request, or all at one level): its efficiency strictly falls rung
        # by rung, so the greedy order is rung-major over the members, oldest first.
        order = np.arange(len(req)).reshape(group_sizes[0], -1).T.reshape(-1)
    else:
        order = np.lexsort((req, -table[:, 5]))  # best efficiency first; ties: oldest request first
    sums = np.zeros((len(order) + 1, 4))
    np.cumsum(table[order, 1:5], axis=0, out=sums[1:])
    return Rungs(req[order], table[order, 0], table[order, 6], sums[:, 0], sums[:, 1], sums[:, 2], sums[:, 3])
