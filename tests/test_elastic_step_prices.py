"""Elastic prices a step at what its graph bucket measured lately, whatever one smooth
correction of the profile fits, and prices no prefill load once no prompt waits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from optimus.policy.base import RequestView, StepFeedback, StepView
from optimus.policy.elastic.bucket_memory import BucketMemory
from optimus.policy.elastic.controller import ElasticPolicy
from optimus.policy.elastic.graph_buckets import GraphBuckets
from optimus.policy.elastic.latency import LatencyPoint, LatencyProfile

REAL_8B_TAU = {1: 1.0, 2: 1.24, 4: 1.56, 8: 1.89, 16: 2.27, 32: 2.68}
# What the 128- and 256-row graphs take at 64 requests (the H100's SDAR-8B steps) and a
# profile that has the two the wrong way round by a few percent each
MEASURED_MS = {128: 8.45, 256: 9.84}
PROFILED_MS = ((64, 8.8), (128, 9.0), (256, 9.3), (512, 14.0), (1024, 22.0), (2048, 40.0))


def _profile() -> LatencyProfile:
    return LatencyProfile(tuple(LatencyPoint(t, ms / 1e3, 64) for t, ms in PROFILED_MS))


def test_a_bucket_averages_its_first_steps_then_moves_by_its_rate_and_is_forgotten_when_idle():
    memory = BucketMemory(rate=0.5, min_steps=2, max_age=3)
    memory.observe(128, 2.0, 1.0)
    assert memory.known() == {}  # one step is not enough
    memory.observe(128, 8.0, 1.0)
    assert memory.known()[128] == pytest.approx(4.0)  # the geometric mean of 2 and 8
    memory.observe(128, 4.0 * math.exp(4.0), 1.0)
    assert memory.known()[128] == pytest.approx(4.0 * math.exp(2.0))  # moved half the way (in log)
    for _ in range(4):
        memory.observe(256, 1.0, 1.0)
    assert set(memory.known()) == {256}  # 128 idle for more than three steps: forgotten
    memory.observe(128, 3.0, 1.0)
    memory.observe(128, 3.0, 1.0)
    assert memory.known()[128] == pytest.approx(3.0)  # measured afresh, not averaged with the old


def test_apply_prices_remembered_buckets_and_leaves_the_rest_to_the_correction():
    memory = BucketMemory(min_steps=1)
    memory.observe(256.0, 2.0, 1.0)
    rows = np.array([128.0, 256.0, 300.0])
    out = memory.apply(rows, rows, np.array([7.0, 7.0, 7.0]), lambda n: np.full(len(n), 5.0))
    assert out.tolist() == [7.0, 10.0, 7.0]
    # eager steps, kept by band: 600 rows (band 1,024) priced at the profile's 600 rows times its ratio
    memory.observe(1024.0, 3.0, 1.0)
    out = memory.apply(np.array([1024.0, 2048.0]), np.array([600.0, 1500.0]), np.array([7.0, 7.0]), lambda n: n / 100)
    assert out.tolist() == pytest.approx([18.0, 7.0])


def _feedback(rows: int, size: int, ms: float) -> StepFeedback:
    n = 64
    committed = (1,) * n if size == 1 else (2,) * 15 + (1,) * (n - 15)  # 1.23 a window at size 2
    return StepFeedback(rows, ms / 1e3, (size,) * n, committed, tuple(f"r{i}" for i in range(n)), (size,) * n,
                        device_s=ms / 1e3)


def _fed(steps: int) -> ElasticPolicy:
    policy = ElasticPolicy(profile=_profile(), tau_prior=REAL_8B_TAU, per_request=False,
                           graph_buckets=GraphBuckets(1024))
    for i in range(steps):
        rows = 128 if i % 2 else 256
        policy.observe(_feedback(rows, rows // 128, MEASURED_MS[rows]))
    return policy


def test_decoding_steps_teach_each_bucket_its_own_latency():
    policy = _fed(40)
    policy.correction.log_stretch = math.log(1.3)  # what a burst of prompts left the correction at
    predicted = policy.predict_latency(np.array([128.0, 256.0]), 64) * 1e3
    assert predicted == pytest.approx([MEASURED_MS[128], MEASURED_MS[256]], rel=1e-3)
    # a step mostly of prompt rows teaches no bucket
    for _ in range(4):
        policy.observe(StepFeedback(1024, 0.05, (1,), (1,), ("p",), (1,), device_s=0.05))
    assert set(policy.memory.known()) == {128.0, 256.0}
    # eager steps past the largest graph (1,024) teach their band: launches pace them, not rows
    profiled = policy.profile.predict_many(np.array([1500.0]), 64)[0]
    for rows in (1100, 1300, 1700, 2000):
        policy.observe(_feedback(rows, 16, 2e3 * float(policy.profile.predict_many(np.array([rows * 1.0]), 64)[0])))
    assert set(policy.memory.known()) == {128.0, 256.0, 2048.0}
    assert policy.predict_latency(np.array([1500.0]), 64)[0] == pytest.approx(2 * profiled, rel=1e-6)


def test_the_controller_runs_the_bucket_that_measured_faster_where_the_profile_says_otherwise():
    # 64 requests at real-8b rates, 1.26 ms of host time around every step but the overlapped
    # ones at size 1: size 1 (128 rows) commits 64 / 8.45 = 7.6 tokens per ms, size 2 (256 rows)
    # 64 x 1.24 / (9.84 + 1.26) = 7.1; on the profile alone size 2 looks better (7.5 against 7.1)
    views = tuple(RequestView(f"r{i}", 32, 32, None, None) for i in range(64))
    chosen = {}
    for steps in (0, 40):
        policy = _fed(steps)
        policy.unit_steps_overlap = True
        for _ in range(8):
            policy.gaps.observe(1.26e-3, False)
        c = policy.correction  # the correction back on the profile: whatever it fitted is not the point here
        c.log_scale, c.log_stretch, c.slope_ratio = 0.0, 0.0, 1.0
        chosen[steps] = set(policy.choose(StepView(views, fixed_tokens=0, token_budget=4096)))
    assert chosen[0] != {1}  # the profile's prices: the test can tell the two apart
    assert chosen[40] == {1}


def test_once_no_prompt_waits_the_controller_stops_pricing_the_prefill_a_burst_brought():
    # Just after a burst of prompts is prefilled, the load per commit is still the burst's
    # (rows of prompt for every commit): a step looks large whatever its chunks, and larger
    # chunks ride in it. With nothing left to prefill the step runs its chunks and stores
    # alone: on the H100, upgrades there pushed 128 requests' steps from the 256-row graph
    # (10.6 ms) to the 512-row one (16 ms) for five or six steps of every run.
    measured = LatencyProfile(tuple(LatencyPoint(t, ms / 1e3, 64) for t, ms in
                                    ((64, 8.0), (128, 8.45), (256, 9.84), (512, 14.0), (1024, 22.0), (2048, 40.0))))
    views = tuple(RequestView(f"r{i}", 32, 32, None, None) for i in range(64))
    chosen = {}
    for pending in (True, False):
        policy = ElasticPolicy(profile=measured, tau_prior=REAL_8B_TAU, per_request=False,
                               graph_buckets=GraphBuckets(1024), unit_steps_overlap=True)
        for _ in range(8):  # steps of 300 prompt rows beside 64 requests at size 1 (128 rows)
            policy.gaps.observe(1.26e-3, False)
            policy.load.observe(428, 128.0, 0.0, 64)
        view = StepView(views, fixed_tokens=0, token_budget=4096, load_pending=pending)
        chosen[pending] = set(policy.choose(view))
    assert chosen[True] != {1}  # the lump priced: larger chunks ride in a large step
    assert chosen[False] == {1}
