"""The elastic policy's per-step shortcuts give exactly what the straightforward formulas give:
an incremental fit equals the batch fit, cached and shared pieces equal fresh ones, and the
path that skips per-request overrides equals the one that reads them."""

from __future__ import annotations

import collections
import dataclasses
import math
import random

import numpy as np

from optimus.policy import RequestView, StepFeedback, StepView
from optimus.policy.elastic.controller import ElasticPolicy
from optimus.policy.elastic.confidence import RequestConfidence, _nearest_level
from optimus.policy.elastic.estimators import TauEstimator
from optimus.policy.elastic.experts import ExpertRouting
from optimus.policy.elastic.host_share import HostShare, theil_sen
from optimus.policy.elastic.ladders import build_ladder, store_variance
from optimus.policy.elastic.latency import LatencyProfile


def test_incremental_host_share_equals_the_batch_theil_sen_fit():
    rng = random.Random(0)
    for window in (4, 5, 16):
        share, points = HostShare(window=window), collections.deque(maxlen=window)
        for _ in range(120):  # many evictions; repeated token counts (no slope) and zero seconds
            point = (float(rng.choice([rng.randrange(1, 4000), 256, 512])), rng.choice([rng.random() * 1e-3, 0.0]))
            share.observe(*point)
            points.append(point)
            if len(points) >= share.min_steps:
                assert (share.intercept, share.slope) == theil_sen(*np.array(points).T)
        share.observe(256, float("nan"))  # no measurement: the line stays
        assert (share.intercept, share.slope) == theil_sen(*np.array(points).T)


def test_vectorized_request_confidence_follows_the_per_request_recurrence():
    rng = random.Random(1)
    conf = RequestConfidence(forget_after=8)
    state: dict[str, list[float]] = {}  # request -> [S, E, level], by the class docstring's recurrence
    for step in range(200):
        ids = tuple(rng.sample([f"r{i}" for i in range(12)], rng.randrange(1, 8)))
        sizes = tuple(rng.choice((1, 2, 4, 8, 32)) for _ in ids)
        committed = tuple(rng.randint(1, c) for c in sizes)
        expected = np.array([1.0 + 0.3 * c ** 0.6 for c in sizes])
        conf.observe(ids, sizes, committed, expected)
        for rid, c, k, t in zip(ids, sizes, committed, expected.tolist()):
            s, e, level = state.get(rid, [0.0, 0.0, 1.0])
            s, e = 0.95 * s, 0.95 * e
            if c > 1:
                s, e = s + min(k, c) - 1, e + max(t - 1.0, 0.0)
            r = (4.0 + s) / (4.0 + e)
            state[rid] = [s, e, level if level / 2 <= r <= level * 2 else _nearest_level(r)]
        if (step + 1) % 8 == 0:  # forgotten (and fresh when back) once absent for 8 observations
            state = {rid: v for rid, v in state.items() if rid in conf._level}
        assert {rid: (s, e) for rid, (s, e, _) in state.items()} == conf._excess
        assert conf.levels(sorted(state)) == [state[rid][2] for rid in sorted(state)]


def test_ladder_rungs_are_the_differences_of_its_hull():
    p = ElasticPolicy(LatencyProfile.synthetic(0.01, 256, 4e-5), {1: 1.0, 4: 1.6, 8: 3.5, 16: 4.0, 32: 9.0})
    for cap, level in ((32, 1.0), (12, 0.25), (1, 1.0)):
        lad = build_ladder(cap, p.chunk_sizes, lambda c: p._tau(c, level), 1.37)
        taus = p._tau(lad.sizes, level)
        np.testing.assert_array_equal(lad.taus, taus)
        np.testing.assert_array_equal(lad.costs, lad.sizes + 1.37 * taus)
        np.testing.assert_array_equal(lad.variances, store_variance(lad.sizes, taus))
        dtau, dcost = np.diff(lad.taus), np.diff(lad.costs)
        expect = np.stack([lad.sizes[1:], dtau, dcost, np.diff(lad.variances), np.diff(lad.sizes), dtau / dcost,
                           lad.sizes[:-1]], 1)
        np.testing.assert_array_equal(lad.rungs, expect.reshape(-1, 7))


def test_experts_profile_shares_its_model_between_blended_curves():
    pairs = [(b * c, 0.01 * (1 + 0.1 * math.log(b)) + 3e-5 * b * c, b) for b in (1, 16, 64) for c in (1, 4, 32)]
    profile = dataclasses.replace(LatencyProfile.from_pairs(pairs), routing=ExpertRouting(256, 8))
    model, n = profile.cost_model, np.array([1.0, 7.0, 300.0, 5000.0])
    lo, hi = profile._by_batch[16], profile._by_batch[64]
    w = (math.log(40) - math.log(16)) / (math.log(64) - math.log(16))
    ratio = lambda curve, at: np.interp(n, curve.x, curve.y / np.maximum(model(curve.x, at), 1e-12))  # noqa: E731
    expect = (1 - w) * (model(n, 40) * ratio(lo, 16)) + w * (model(n, 40) * ratio(hi, 64))
    for _ in range(2):  # the second call reads the cached ratios
        np.testing.assert_array_equal(profile.predict_many(n, 40), expect)


def test_tau_table_kept_prior_follows_new_sizes():
    tau = TauEstimator((1, 2, 4, 8), adapt_prior=True)
    tau.observe((4, 8), (2, 3))
    first = tau.table
    tau.observe((4, 16), (3, 5))  # a size the prior never named
    kept = tau.table
    tau._table, tau._prior_cache = None, None
    for a, b in zip(kept, tau.table):
        np.testing.assert_array_equal(a, b)
    assert len(kept[0]) == len(first[0]) + 1


def test_choice_without_overrides_equals_the_choice_that_reads_them():
    """Every request overridden to 'elastic' takes the per-request path; none, the shortcut."""
    profile = LatencyProfile.synthetic(0.01, 256, 4e-5)
    plain, marked = ElasticPolicy(profile), ElasticPolicy(profile)
    rng = random.Random(2)
    ids = [str(i) for i in range(48)]
    for _ in range(60):
        caps = [rng.choice((3, 8, 32)) for _ in ids]
        views = [StepView(tuple(RequestView(r, c, 32, None, o) for r, c in zip(ids, caps)), 16, 4096)
                 for o in (None, "elastic")]
        out = plain.choose(views[0])
        assert marked.choose(views[1]) == out and plain.last_plan == marked.last_plan
        feedback = StepFeedback(sum(out) * 2 + 16, 0.01 + 1e-5 * sum(out), tuple(out),
                                tuple(rng.randint(1, c) for c in out), tuple(ids), tuple(out))
        plain.observe(feedback)
        marked.observe(feedback)
