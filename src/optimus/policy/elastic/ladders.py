"""The greedy allocation's structures: per request, the ladder of chunk sizes on the upper
concave hull of (cost, tau), and all requests' upgrades merged in order of falling marginal
efficiency (the rungs). A pure function of the estimates, rebuilt when they move; which
request of a ladder each upgrade reaches is decided per step (``by_work_left``)."""

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
    """``tau``: sizes [K] -> expected commits per step [K] (the request's own curve). At most a
    handful of sizes: the arithmetic runs on Python floats (the same IEEE operations as the
    arrays', without an array call per step of it)."""
    sizes = sorted({float(c) for c in chunk_sizes if c <= cap} | {1.0, float(cap)})
    taus = tau(np.array(sizes)).tolist()
    costs = [c + rows_per_commit * t for c, t in zip(sizes, taus)]
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
    sizes, taus, costs = [sizes[i] for i in hull], [taus[i] for i in hull], [costs[i] for i in hull]
    variances = [t * (c - t) for c, t in zip(sizes, taus)]  # store_variance
    rungs = []
    for j in range(1, len(hull)):
        dtau, dcost = taus[j] - taus[j - 1], costs[j] - costs[j - 1]
        rungs.append((sizes[j], dtau, dcost, variances[j] - variances[j - 1], sizes[j] - sizes[j - 1],
                      dtau / dcost, sizes[j - 1]))
    return Ladder(np.array(sizes), np.array(taus), np.array(costs), np.array(variances),
                  np.array(rungs).reshape(len(rungs), 7))


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
    groups = [(ladders[key], members) for key, members in _groups(keys).items() if len(ladders[key].sizes) >= 2]
    if not groups:
        zero = np.zeros(1)
        return Rungs(np.zeros(0, dtype=int), np.zeros(0), np.zeros(0), zero, zero, zero, zero)
    if len(groups) == 1:
        # One ladder (one request, or all at one level): its efficiency strictly falls rung
        # by rung, so the greedy order is rung-major over the members, oldest first.
        lad, members = groups[0]
        req, table = np.tile(members, len(lad.rungs)), np.repeat(lad.rungs, len(members), axis=0)
    else:
        req = np.concatenate([np.repeat(members, len(lad.rungs)) for lad, members in groups])  # member-major
        table = np.concatenate([np.tile(lad.rungs, (len(members), 1)) for lad, members in groups])
        order = np.lexsort((req, -table[:, 5]))  # best efficiency first; ties: oldest request first
        req, table = req[order], table[order]
    sums = np.zeros((len(req) + 1, 4))
    np.cumsum(table[:, 1:5], axis=0, out=sums[1:])
    return Rungs(req, table[:, 0], table[:, 6], sums[:, 0], sums[:, 1], sums[:, 2], sums[:, 3])


def _groups(keys: list) -> dict:
    """Each distinct key and the indices of ``keys`` holding it, ascending, in first-seen order."""
    if keys and keys.count(keys[0]) == len(keys):  # everyone on one ladder: the common case
        return {keys[0]: np.arange(len(keys))}
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def by_work_left(keys: tuple, remaining: np.ndarray) -> np.ndarray:
    """[R] ``assign``: among the requests of one ladder (equal ``keys``), the k-th oldest's
    place goes to the one with the k-th most work ``remaining`` (ties: the older). Equal
    upgrades then reach the laggards first, so requests that started together finish
    together instead of the first ones racing ahead and leaving a tail of steps too few
    requests share. Identity when the oldest already have the most left.

    The work is counted in blocks: at a finer grain the ranks swap step after step and a
    request's size with them, which the closed-loop simulations (chunks kept until they
    finish) priced at 1-3% at 16-64 requests; by blocks they cost nothing there, and kept
    most of the gain in a batch that starts together (docs/policies.md)."""
    assign = np.arange(len(keys))
    for members in _groups(list(keys)).values():  # each ladder's requests, oldest first
        members = np.asarray(members)
        assign[members] = members[np.argsort(-remaining[members], kind="stable")]
    return assign
