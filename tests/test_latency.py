"""Latency profile: hinge fit and knee, monotone per-batch prediction, JSON, the profiler loop
and the ``optimus profile`` command."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from optimus.policy.elastic.latency import LatencyPoint, LatencyProfile, default_profile_path, fit_hinge
from optimus.policy.elastic.profiler import grid_cells, profile_latency


def hinge(n: float, t0: float = 0.010, knee: float = 384.0, slope: float = 0.010 / 384) -> float:
    return t0 + slope * max(0.0, n - knee)


def grid_points(noise: float = 0.0, repeats: int = 1, seed: int = 0) -> list[tuple[int, float, int]]:
    rng = random.Random(seed)
    return [(b * c, hinge(b * c) * (rng.lognormvariate(0, noise) if noise else 1.0), b)
            for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) for c in (1, 2, 4, 8, 16, 32) for _ in range(repeats)]


def test_fit_recovers_the_knee_of_an_exact_hinge():
    profile = LatencyProfile.from_pairs(grid_points())
    fit = profile.fit
    assert profile.knee == pytest.approx(384, rel=0.01)
    assert fit.t0 == pytest.approx(0.010, rel=0.01)
    assert fit.b == pytest.approx(0.010 / 384, rel=0.02)


def test_fit_recovers_the_knee_under_noise():
    profile = LatencyProfile.from_pairs(grid_points(noise=0.05, repeats=3, seed=1))
    assert profile.knee == pytest.approx(384, rel=0.15)


def test_fit_of_a_flat_curve_has_no_knee():
    fit = fit_hinge(np.array([1, 10, 100, 1000]), np.array([0.01, 0.01, 0.0101, 0.0099]))
    assert fit.b == 0 and math.isinf(fit.knee)


def test_synthetic_profile_predicts_its_hinge_exactly():
    p = LatencyProfile.synthetic(t0=0.02, knee=300, slope=1e-4)
    for n in (1, 50, 299, 300, 301, 450, 1000, 5000):
        assert p.predict(n) == pytest.approx(0.02 + 1e-4 * max(0, n - 300), rel=1e-6)
    # Past the measured points the curve follows the fitted hinge.
    assert p.predict(100000) == pytest.approx(0.02 + 1e-4 * (100000 - 300), rel=1e-3)
    assert p.knee == pytest.approx(300, rel=0.01)


def test_prediction_is_monotone_and_uses_the_batch_curves():
    # Many requests cost more than few at equal tokens (cache reads): 256 x 1 vs 8 x 32.
    pairs = [(b * c, 0.006 + 0.0001 * b + 0.00002 * b * c, b) for b in (1, 8, 64, 256) for c in (1, 4, 16, 32)]
    p = LatencyProfile.from_pairs(pairs)
    assert p.predict(256, batch=256) > p.predict(256, batch=8) * 2
    ns = np.arange(1, 20000, 7)
    for batch in (1, 5, 8, 40, 256, 1000):
        y = p.predict_many(ns, batch)
        assert np.all(np.diff(y) >= -1e-15)
    lo, mid, hi = (p.predict(256, batch=b) for b in (8, 20, 64))
    assert lo < mid < hi  # interpolated in log(batch) between the grid's curves


def test_noisy_repeats_are_made_monotone():
    p = LatencyProfile.from_pairs([(1, 0.010), (2, 0.012), (2, 0.011), (4, 0.009), (8, 0.013)])
    ys = [p.predict(n) for n in (1, 2, 4, 8)]
    assert ys == sorted(ys)


def test_json_round_trip_and_paths(tmp_path, monkeypatch):
    p = LatencyProfile.from_pairs(grid_points(noise=0.02), device="NVIDIA H100", model_id="sdar-8b-bfloat16")
    path = p.save(tmp_path / "sub" / "profile.json")
    q = LatencyProfile.load(path)
    assert q.points == p.points and (q.device, q.model_id) == (p.device, p.model_id)
    assert q.knee == pytest.approx(p.knee)
    assert json.loads(path.read_text())["fit"]["knee"] == pytest.approx(p.knee)
    data = json.loads(path.read_text())
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="version"):
        LatencyProfile.load(path)
    monkeypatch.setenv("OPTIMUS_CACHE", str(tmp_path / "cache"))
    a = default_profile_path("NVIDIA H100 80GB HBM3", "/models/SDAR-8B-Chat-b32")
    assert a.parent == tmp_path / "cache" / "profiles" and a.suffix == ".json"
    assert a != default_profile_path("NVIDIA H200", "/models/SDAR-8B-Chat-b32")
    assert a != default_profile_path("NVIDIA H100 80GB HBM3", "/other/SDAR-8B-Chat-b32")


def test_invalid_points_are_refused():
    with pytest.raises(ValueError):
        LatencyPoint(0, 0.01)
    with pytest.raises(ValueError):
        LatencyPoint(4, 0.0)
    with pytest.raises(ValueError):
        LatencyProfile(())


def test_profiler_measures_every_cell_and_recovers_the_knee():
    calls: list[tuple[int, int]] = []
    rng = random.Random(3)

    def step(batch: int, chunk: int) -> float:
        calls.append((batch, chunk))
        if len(calls) % 11 == 0:
            return 5.0  # a stray stall: the median of the repeats ignores it
        return hinge(batch * chunk) * rng.lognormvariate(0, 0.02)

    batches, chunks = (1, 4, 16, 64, 256), (1, 4, 16, 32)
    p = profile_latency(step, batches, chunks, warmup=1, repeats=5, progress=False, max_tokens=4096)
    cells = grid_cells(batches, chunks, max_tokens=4096)
    assert (256, 32) not in cells and len(p.points) == len(cells)
    assert len(calls) == len(cells) * 6
    assert {(q.batch, q.tokens // q.batch) for q in p.points} == set(cells)
    assert max(q.seconds for q in p.points) < 1.0
    assert p.knee == pytest.approx(384, rel=0.15)


def test_profiler_rejects_bad_grids():
    with pytest.raises(ValueError):
        profile_latency(lambda b, c: 0.01, (), (1,), progress=False)
    with pytest.raises(ValueError, match="max_tokens"):
        profile_latency(lambda b, c: 0.01, (8,), (8,), progress=False, max_tokens=10)
    with pytest.raises(ValueError):
        profile_latency(lambda b, c: 0.0, (1,), (1,), progress=False)


def test_profile_command_writes_a_loadable_profile(tiny_checkpoint, tmp_path, capsys):
    from optimus.cli import main

    model = tiny_checkpoint("sdar")
    out = tmp_path / "p.json"
    rc = main(["profile", "--model", str(model), "--batches", "1,2", "--chunks", "1,4", "--context", "16",
               "--warmup", "0", "--repeats", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    p = LatencyProfile.load(out)
    assert sorted((q.batch, q.tokens) for q in p.points) == [(1, 1), (1, 4), (2, 2), (2, 8)]
    assert "sdar" in p.model_id and p.device.startswith("cpu")
    assert "knee" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse refuses a chunk size of 0 before loading anything
        main(["profile", "--model", str(model), "--chunks", "0"])
