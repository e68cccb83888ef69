"""Elastic prices a step served from a CUDA graph at its bucket, and sees the eager cliff past
the largest graph."""

from __future__ import annotations

import numpy as np
import pytest

from optimus.policy.elastic.controller import ElasticPolicy
from optimus.policy.elastic.graph_buckets import GraphBuckets, eager_cell
from optimus.policy.elastic.latency import LatencyPoint, LatencyProfile
from optimus.policy.elastic.profiler import profile_latency


def test_steps_pad_to_their_power_of_two_bucket_up_to_the_largest_graph():
    pad = GraphBuckets(2048).pad(np.array([1, 8, 9, 600, 1152, 1872, 2048, 2049, 5000]))
    assert pad.tolist() == [8, 8, 16, 1024, 2048, 2048, 2048, 2049, 5000]
    with pytest.raises(ValueError):
        GraphBuckets(1000)


def test_the_policy_pads_to_the_buckets_the_runner_replays():
    from optimus.executor.cuda_graphs import step_key

    tokens = np.arange(1, 2049)
    assert GraphBuckets(2048).pad(tokens).tolist() == [step_key(int(n), 1, 1)[0] for n in tokens]


def test_the_eager_cell_lies_just_past_the_limit_on_the_largest_batch_that_divides_it():
    assert eager_cell(2048, [1, 4, 16, 64, 256]) == (256, 9)
    assert eager_cell(512, [1, 4, 16, 64, 256]) == (64, 9)  # 256 x 3 rows would be half again past it
    assert eager_cell(8, [3]) is None


# LLaDA2.0-mini on an H100, graphs to 2,048 tokens: (tokens, batch, ms) of the start-up profile in
# benchmarks/results/h100/policy_sweep_real8b_llada2/startup_profile_contexts.json, and one eager
# step of 2,176 rows at 64 requests from that sweep's step trace (fixed:32)
H100_LLADA2_MINI = ((1, 1, 4.35), (4, 1, 4.44), (4, 4, 5.09), (16, 1, 5.08), (16, 4, 5.72), (16, 16, 7.11),
                    (32, 1, 5.76), (64, 4, 7.96), (64, 16, 11.36), (64, 64, 13.42), (128, 4, 8.65),
                    (256, 16, 13.17), (256, 64, 16.01), (256, 256, 16.85), (512, 16, 14.62), (1024, 64, 20.92),
                    (1024, 256, 21.71), (2048, 64, 27.33), (2176, 64, 63.75), (4096, 256, 60.73),
                    (8192, 256, 83.03))


def _staircase_profile() -> LatencyProfile:
    return LatencyProfile(tuple(LatencyPoint(t, ms / 1e3, b) for t, b, ms in H100_LLADA2_MINI))


def test_elastic_prices_a_step_at_the_bucket_it_replays():
    profile = _staircase_profile()
    plain = ElasticPolicy(profile=profile)
    bucketed = ElasticPolicy(profile=profile, graph_buckets=GraphBuckets(2048))
    rows = np.array([1152.0, 1872.0, 2176.0])
    at_bucket = profile.predict_many(np.array([2048.0, 2048.0, 2176.0]), 64)
    assert bucketed.predict_latency(rows, 64) == pytest.approx(at_bucket)
    assert plain.predict_latency(rows[:1], 64)[0] < 0.9 * at_bucket[0]  # the line between points: too cheap
    assert bucketed.predict_latency(rows[2:], 64)[0] > 2 * bucketed.predict_latency(rows[1:2], 64)[0]  # the cliff


def test_the_profiler_times_extra_cells_after_the_grid():
    timed = []

    def step(batch, chunk):
        timed.append((batch, chunk))
        return 1e-3 * batch * chunk

    profile_latency(step, batches=[1, 4], chunks=[1, 4], warmup=0, repeats=1, progress=False, extra_cells=[(4, 5)])
    assert timed[-1] == (4, 5) and len(set(timed)) == 5


def test_elastic_fills_a_bucket_instead_of_paying_for_the_next_one():
    # 64 requests under real-8b commit rates: 16 for everyone (about 1,170 rows a step) pays for
    # the 2,048-row graph; priced by buckets, the plan stays within the 1,024-row one
    from optimus.policy.base import RequestView, StepView

    tau = {1: 1.0, 2: 1.24, 4: 1.56, 8: 1.89, 16: 2.27, 32: 2.68}
    views = tuple(RequestView(str(i), 32, 32, None, None) for i in range(64))
    rows = {}
    for name, buckets in (("plain", None), ("buckets", GraphBuckets(2048))):
        policy = ElasticPolicy(profile=_staircase_profile(), tau_prior=tau, per_request=False, graph_buckets=buckets)
        sizes = policy.choose(StepView(views, fixed_tokens=0, token_budget=4096))
        rows[name] = sum(c + tau[c] for c in sizes)
    assert rows["plain"] > 1024 >= rows["buckets"]


def test_the_profile_adds_the_eager_step_only_where_graphs_run_and_steps_that_large_can():
    from types import SimpleNamespace

    from optimus.policy.elastic.setup import eager_cells

    def engine(graphs, budget):
        return SimpleNamespace(runner=SimpleNamespace(graphs=graphs),
                               config=SimpleNamespace(scheduler=SimpleNamespace(max_tokens_per_step=budget)))

    graphs = SimpleNamespace(max_tokens=512)
    assert eager_cells(engine(graphs, 8192), [1, 4, 16, 64]) == [(64, 9)]
    assert eager_cells(engine(graphs, 512), [1, 4, 16, 64]) == []  # no step gets past the graphs
    assert eager_cells(engine(graphs, 512), [1, 4, 16, 64], max_tokens=1024) == [(64, 9)]
    assert eager_cells(engine(None, 8192), [1, 4, 16, 64]) == []


def test_a_stretched_correction_prices_the_rows_a_step_runs():
    # The correction stretches the profile's token axis; applied before the bucket padding,
    # a stretch of 1.5 priced 1,136 rows at the 1,024-row graph while they run the 2,048-row one
    import math

    policy = ElasticPolicy(profile=_staircase_profile(), graph_buckets=GraphBuckets(2048))
    policy.correction.log_stretch = math.log(1.5)
    policy.correction.slope_ratio = 1.2  # a fitted correction: stretch and slope both applied
    one_graph = policy.predict_latency(np.array([1136.0, 1872.0, 2048.0]), 64)
    assert one_graph[0] == pytest.approx(one_graph[1]) and one_graph[1] == pytest.approx(one_graph[2])
    assert policy.predict_latency(np.array([1024.0]), 64)[0] < 0.9 * one_graph[0]

