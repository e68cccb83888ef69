"""The elastic controller on a cache scheme that refreshes (dual cache): the refresh load is
known ahead from the scheduler's view, not learned from the steps' rows."""

from __future__ import annotations

import pytest

from optimus.policy import RequestView, StepFeedback, StepView
from optimus.policy.elastic.controller import ElasticPolicy
from optimus.policy.elastic.latency import LatencyProfile

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
