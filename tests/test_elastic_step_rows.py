"""The rows a planned step will run, and what they cost on a staircase of CUDA-graph buckets:
the chunk rows every step runs, the stores larger chunks add in lumps, and the prefill load."""

from __future__ import annotations

import numpy as np
import pytest

from optimus.policy import RequestView, StepView
from optimus.policy.elastic.controller import ElasticPolicy
from optimus.policy.elastic.estimators import _lump_law, expected_latency
from optimus.policy.elastic.graph_buckets import GraphBuckets
from optimus.policy.elastic.latency import LatencyProfile

REAL_8B_TAU = {1: 1.0, 2: 1.24, 4: 1.53, 8: 1.89, 16: 2.27, 32: 2.68}


def _buckets(ms_at: dict[int, float]):
    """A step's time by its graph bucket (the next power of two of its rows), in seconds."""
    edges = np.array(sorted(ms_at), dtype=float)
    times = np.array([ms_at[e] for e in sorted(ms_at)]) / 1e3
    return lambda rows: times[np.minimum(np.searchsorted(edges, np.asarray(rows, dtype=float)), len(edges) - 1)]


@pytest.mark.parametrize("mean,var", [(97.0, 242.0), (2.6, 75.0), (10.0, 1200.0 ** 2), (0.0, 50.0)])
def test_a_lump_law_keeps_its_mean_and_variance_and_never_goes_below_zero(mean, var):
    law = _lump_law(np.array([mean]), np.array([var]))
    x, q = np.array([p[0][0] for p in law]), np.array([p[1][0] for p in law])
    assert q.sum() == pytest.approx(1.0) and (x >= 0).all() and (q >= 0).all()
    assert (q * x).sum() == pytest.approx(mean)
    if mean > 0:  # (at zero mean nothing ever comes: no spread either)
        assert (q * (x - mean) ** 2).sum() == pytest.approx(var, rel=0.02)
    if var > mean * mean:  # one rare lump: zero or whole
        assert x.min() == 0.0 and q[x == 0].sum() == pytest.approx(1 - mean / (mean + var / max(mean, 1e-9)))


def test_many_requests_stores_keep_a_step_on_its_bucket_under_a_lumpy_prefill_load():
    """64 requests at C = 4 run 256 chunk rows and store about 97 +- 16 rows every step (the
    512-row graph, 14 ms); a burst of prompts just before left a prefill load of 10 rows a step
    with sd 1,200. The stores do not vanish into the prompts' rare lump: the step is priced
    near its 512-row graph, not at the bare floor's 256-row one (9.4 ms)."""
    latency = _buckets({128: 8.1, 256: 9.4, 512: 14.0, 1024: 22.0, 1 << 20: 300.0})
    floor = np.array([256.0])
    t = expected_latency(latency, floor, [(np.array([97.0]), np.array([242.0])), (np.array([10.0]), np.array([1.44e6]))])
    assert 13.5e-3 < t[0] < 15.5e-3
    near = expected_latency(latency, np.array([160.0]), [(np.array([90.0]), np.array([100.0]))])
    assert 9.4e-3 < near[0] < 14e-3  # 250 +- 10 rows straddle the 256-row edge: some steps pay the 512-row graph


def test_after_a_burst_of_prompts_elastic_leaves_a_size_the_next_bucket_makes_worse():
    """Elastic arrives at 64 requests planning 256 chunk positions (C = 4, what 16 requests
    chose); their prompts came in four steps of 4,096 rows, 30 steps ago, and their load has
    not yet decayed. On the graphs' staircase C = 4 runs 354 rows on the 512-row graph: 98
    commits in 15.7 ms against 64 in 8 ms at C = 1 (whose steps overlap the host). It must move
    to C = 1 (it held C = 4 for whole runs on an H100 while the prompts' load priced its stores
    at the 256-row graph)."""
    profile = LatencyProfile.synthetic(0.008, 128, 0.00002)  # 8 ms flat to 128 rows, then 20 us a row
    policy = ElasticPolicy(profile, REAL_8B_TAU, graph_buckets=GraphBuckets(1024), unit_steps_overlap=True)
    policy.target = 256
    for _ in range(4):  # the prompts' steps: 4,096 rows beside a few commits
        policy.load.observe(4096, 0.0, 0.0, 16)
    for _ in range(30):  # decoding steps at C = 4
        policy.load.observe(64 * 4 + 98, 64 * 4 + 98.0, 64 * 1.53 * 2.47, 98)
    assert np.sqrt(policy.load.extra_var) > 400 and policy.load.per_commit > 1  # the burst still weighs
    view = StepView(tuple(RequestView(f"r{i}", 32, 32, None) for i in range(64)), 0, 1 << 20)
    assert policy.choose(view) == [1] * 64


def test_a_rare_lump_is_no_larger_than_the_largest_step_so_its_cost_grows_with_its_mean():
    """Just after 256 prompts were prefilled (four steps of 4,096 rows) the load's spread is
    4,300 rows. Unbounded, its rare lump of ``mu + var / mu`` rows comes with probability
    ``~ mu^2 / var``: a plan bringing twice the load (twice the commits) paid four times the
    lump, and elastic held 256 LLaDA2.0-mini requests at C = 1. No step runs more rows than
    the largest the engine ran: there the lump's cost grows with its mean, as the load does."""
    latency = _buckets({512: 20.0, 1024: 25.0, 2048: 35.0, 4096: 90.0, 1 << 20: 200.0})
    floor, var = np.array([512.0]), np.array([4300.0 ** 2])

    def extra(mean: float, ceiling: float) -> float:
        t = expected_latency(latency, floor, [(np.array([mean]), var)], ceiling)[0]
        return t - latency(floor)[0]

    unbounded = extra(1400.0, np.inf) / extra(700.0, np.inf)
    bounded = extra(1400.0, 4096.0) / extra(700.0, 4096.0)
    assert unbounded == pytest.approx(4.0, rel=0.1) and bounded == pytest.approx(2.0, rel=0.05)
    law = _lump_law(np.array([700.0]), var, np.array([4096.0 - 512.0]))
    x, q = np.array([p[0][0] for p in law]), np.array([p[1][0] for p in law])
    assert x.max() == 4096.0 - 512.0 and (q * x).sum() == pytest.approx(700.0)  # the mean is kept
