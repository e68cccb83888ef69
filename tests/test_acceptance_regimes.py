"""Acceptance regimes (decoding/regimes.py): names resolve to replayable profiles, and the
parametric real-8b regime replays the window tau it was calibrated to."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from optimus.decoding import regimes
from optimus.decoding.replay import ReplayAcceptance, load_acceptance
from optimus.policy.elastic.setup import tau_prior_from


def replayed_window_tau(acceptance, chunk: int, windows: int, seed: int = 0) -> float:
    """C / mean steps to clear a fully masked window of C, drawing as the engine's replay does."""
    replay = ReplayAcceptance(acceptance, seed=seed)
    steps = 0
    for _ in range(windows):
        left = chunk
        while left:
            left -= int(replay.counts(np.array([chunk]), np.array([left]))[0])
            steps += 1
    return chunk * windows / steps


def test_real_8b_is_calibrated_to_the_published_commit_counts():
    model = regimes.calibrate()
    tau = model.window_tau()
    for c, target in regimes.REAL_8B_TARGET.items():
        assert tau[c] == pytest.approx(target, rel=1e-6)
    # Between the anchors: concave, rising, and a few tokens per forward, as published.
    values = [tau[c] for c in regimes.CHUNKS]
    assert values == sorted(values) and values[0] == 1.0
    gains = [b - a for a, b in zip(values[1:], values[2:])]
    assert all(g > 0 for g in gains) and values[-1] < 3.0
    # Farther positions pass less often; a window with more masked positions commits more.
    assert model.pass_probs(8).tolist() == sorted(model.pass_probs(8).tolist(), reverse=True)
    means = [sum(k * p for k, p in enumerate(model.commit_distribution(m))) for m in (1, 2, 8, 32)]
    assert means == sorted(means) and means[0] == 1.0


def test_the_replay_of_real_8b_shows_its_calibrated_window_tau():
    acceptance = regimes.load("real-8b")
    expected = regimes.calibrate().window_tau()
    assert acceptance.window_tau() == pytest.approx(expected, rel=0.01)  # histogram rounding only
    for c in (2, 8, 32):
        assert replayed_window_tau(acceptance, c, windows=3000) == pytest.approx(expected[c], rel=0.03), c


def test_regime_names_resolve_for_benchmarks_and_the_elastic_prior(tmp_path):
    tasks = regimes.resolve("tasks")
    assert tasks == regimes.STORED["tasks"] and load_acceptance(tasks).by_open
    prose = load_acceptance(regimes.resolve("prose"))  # the default model on free prose: about 1 a step
    assert prose.by_open and 1.0 <= prose.window_tau()[32] < 1.5 < load_acceptance(tasks).window_tau()[32]
    path = regimes.resolve("real-8b")
    data = json.loads(path.read_text())
    assert set(data) >= {"histograms", "by_open", "tau_per_chunk"}
    assert tau_prior_from("real-8b") == pytest.approx(load_acceptance(path).window_tau())
    own = tmp_path / "profile.json"
    own.write_text(json.dumps({"distribution": {"1": [1], "4": [2, 3]}}))
    assert regimes.resolve(str(own)) == own
    with pytest.raises(FileNotFoundError):
        regimes.resolve("no-such-regime")


def test_a_block_4_model_replays_a_wider_window_a_block_at_a_time():
    """The shipped SmolLM2 dLLM (block 4) on chat prose: a window of 8 to 32 decodes block by
    block, so it commits per step what a window of 4 does, never more than 4 in a step."""
    acceptance = regimes.load("smollm2-prose")
    assert acceptance.block == 4
    tau = acceptance.window_tau()
    measured = json.loads(regimes.resolve("smollm2-prose").read_text())["tau_per_chunk"]
    assert tau[4] == pytest.approx(measured["4"], rel=0.02)
    for c in (8, 16, 32):
        assert tau[c] == pytest.approx(tau[4], rel=1e-9), c
        assert replayed_window_tau(acceptance, c, windows=500) == pytest.approx(tau[4], rel=0.05), c
    replay = ReplayAcceptance(acceptance, seed=1)
    lefts = np.repeat(np.arange(1, 33), 50)
    assert replay.counts(np.full(lefts.size, 32), lefts).max() <= 4
    # Without the block the same observations would be rescaled to the wider window.
    unbounded = load_acceptance(regimes.resolve("smollm2-prose")).__class__(acceptance.by_chunk, acceptance.by_open)
    assert unbounded.window_tau()[32] > 1.3 * tau[32]


@pytest.mark.parametrize("regime", ["real-8b", "tasks"])
def test_replayed_draws_are_the_carried_observations_of_their_bucket(regime):
    # Draw i of a window with m of its C positions masked commits the i-th observation of the
    # measured bucket nearest (C, m), carried to m (Acceptance.commits_given_masked).
    acc = load_acceptance(regimes.resolve(regime))
    replay = ReplayAcceptance(acc, seed=5)
    u = np.random.default_rng(5)
    for chunk, masked in ((32, 32), (32, 7), (11, 11), (14, 3), (2, 1), (1, 1)):
        want = acc.commits_given_masked(chunk, masked)
        draws = u.random(64)
        got = replay.counts(np.full(64, chunk), np.full(64, masked))
        assert got.tolist() == [min(want[int(x * len(want))], masked) for x in draws]
