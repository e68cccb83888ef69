"""The elastic controller on a cache scheme that refreshes (dual cache): the refresh load is
known ahead from the scheduler's view, not learned from the steps' rows."""

from __future__ import annotations

import numpy as np
import pytest

from optimus.policy import RequestView, StepFeedback, StepView
from optimus.policy.elastic.controller import ElasticPolicy
from optimus.policy.elastic.latency import LatencyProfile
from optimus.policy.elastic.refreshes import RefreshLoad

N, BLOCK, REFRESH = 64, 32, 384  # requests, block, rows of one refresh (prompt 256 + canvas 128)


def _policy() -> ElasticPolicy:
    # one size: what is priced, not what is chosen
    return ElasticPolicy(LatencyProfile.synthetic(0.01, 512, 2e-5), chunk_sizes=(1,), hysteresis=0.0)


def _view(refresh: float) -> StepView:
    return StepView(tuple(RequestView(f"r{i}", BLOCK, BLOCK, None) for i in range(N)), 0, 1 << 20,
                    refresh_rows=refresh)


@pytest.mark.parametrize("refresh", [0.0, float(REFRESH)])
def test_refresh_rows_are_priced_per_commit_from_the_first_step(refresh):
    p = _policy()
    assert p.choose(_view(refresh)) == [1] * N
    # a window and its store row per commit, plus a refresh of REFRESH rows per BLOCK commits
    assert p.last_plan.predicted_tokens == pytest.approx(N * (2 + refresh / BLOCK))


def test_refresh_waves_do_not_move_the_learned_load():
    """Refresh rows arrive in waves (a third of the requests refresh in one step, none in the
    next two); reported as refresh rows they leave the learned load at zero, and the price of
    the next plan is the known one."""
    p = _policy()
    for step in range(60):
        p.choose(_view(REFRESH))
        waves = N // 3 if step % 3 == 0 else 0
        refreshed = waves * (REFRESH - 1)
        p.observe(StepFeedback(2 * N + refreshed, 0.02, (1,) * N, (1,) * N, tuple(f"r{i}" for i in range(N)),
                               refresh_rows=refreshed))
    assert p.load.per_commit == pytest.approx(0.0, abs=0.05)
    p.choose(_view(REFRESH))
    assert p.last_plan.predicted_tokens == pytest.approx(N * (2 + REFRESH / BLOCK), rel=0.01)
    # the same steps without their refresh rows reported: the load is learned, and swings
    q = _policy()
    per_commit = []
    for step in range(60):
        q.choose(_view(0.0))
        refreshed = (N // 3) * (REFRESH - 1) if step % 3 == 0 else 0
        q.observe(StepFeedback(2 * N + refreshed, 0.02, (1,) * N, (1,) * N, tuple(f"r{i}" for i in range(N))))
        per_commit.append(q.load.per_commit)
    assert max(per_commit[30:]) - min(per_commit[30:]) > 1.0


def test_refresh_spread_is_learned_from_the_waves():
    """Requests in step refresh together: a wave of all of them every few steps, none between.
    The dispersion (variance over mean of a step's refresh rows) starts at one refresh's rows,
    as for independent requests, and learns the wave's size."""
    load = RefreshLoad(rate=0.05)
    load.see(REFRESH, np.full(N, BLOCK))
    assert load.per_commit == REFRESH / BLOCK and load.dispersion == REFRESH
    every = BLOCK // 2  # requests committing 2 a step end a block every 16 steps
    wave = N * REFRESH
    for step in range(400):
        load.observe(wave if step % every == 0 else 0, 2 * N)
    expected = wave * (1 - 1 / every)  # var / mean of a wave of `wave` rows with probability 1/every
    assert load.dispersion == pytest.approx(expected, rel=0.35)
    mean, var = load.lump(np.array([2.0 * N]))
    assert mean[0] == pytest.approx(2 * N * REFRESH / BLOCK) and var[0] == pytest.approx(load.dispersion * mean[0])


def test_small_moves_of_the_refresh_rows_keep_the_price():
    load = RefreshLoad()
    blocks = np.full(N, BLOCK)
    assert load.see(REFRESH, blocks)
    assert not load.see(REFRESH * 1.03, blocks) and load.rows == REFRESH  # a request of another length came
    assert load.see(REFRESH * 1.2, blocks) and load.per_commit == pytest.approx(1.2 * REFRESH / BLOCK)
    assert load.see(0.0, blocks) and load.per_commit == 0.0 and not load.see(0.0, blocks)
