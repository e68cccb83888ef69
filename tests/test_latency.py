"""Latency profile: hinge fit and knee, monotone per-batch prediction, JSON, the profiler loop,
the start-up re-check of a cached profile and the ``optimus profile`` command."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from optimus.policy.elastic.latency import LatencyPoint, LatencyProfile, default_profile_path, fit_hinge
from optimus.policy.elastic.profiler import grid_cells, profile_latency, recheck_cells, recheck_profile


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


def test_profile_command_gives_each_request_a_context_of_its_own(tiny_checkpoint, tmp_path, monkeypatch):
    # On an MoE model requests over one shared context route alike (executor/timed_step.py)
    from optimus.cli import main
    from optimus.executor.runner import ModelRunner

    tables = []
    forward = ModelRunner.forward

    def spy(self, batch):
        tables.append(batch.page_table.clone())
        return forward(self, batch)

    monkeypatch.setattr(ModelRunner, "forward", spy)
    assert main(["profile", "--model", str(tiny_checkpoint("sdar")), "--batches", "1,4", "--chunks", "1",
                 "--context", "40", "--warmup", "0", "--repeats", "1", "--out", str(tmp_path / "p.json"),
                 "--no-progress"]) == 0
    widest = max(tables, key=lambda t: t.shape[0])
    assert widest.shape == (4, 3) and widest.unique().numel() == 12  # 3 pages each, none shared


# ---- re-checking a cached profile ------------------------------------------------------------------
def test_json_keeps_context_and_source_and_reads_older_files(tmp_path):
    p = LatencyProfile.from_pairs(grid_points(), device="d", model_id="m", context=64, source="start-up")
    q = LatencyProfile.load(p.save(tmp_path / "p.json"))
    assert (q.context, q.source) == (64, "start-up")
    data = json.loads((tmp_path / "p.json").read_text())
    del data["context"], data["source"]  # written before they were recorded
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = LatencyProfile.load(tmp_path / "old.json")
    assert (old.context, old.source) == (None, "unknown") and old.points == p.points
    assert "by start-up on d, 54 points" in q.describe() and " by " not in old.describe()


def test_recheck_times_a_few_small_measured_steps():
    p = LatencyProfile.from_pairs(grid_points())
    cells = recheck_cells(p)
    assert len(cells) == 3 and cells[0] == (1, 1)
    assert all(b * c <= 256 and (b, c) in p.cells() for b, c in cells)
    timed: list[tuple[int, int]] = []

    def step(batch: int, chunk: int) -> float:
        timed.append((batch, chunk))
        return hinge(batch * chunk) * 1.2

    check = recheck_profile(p, step, warmup=1)
    assert set(timed) == set(cells) and len(timed) == 2 * len(cells)
    assert check.ratio == pytest.approx(1.2) and check.holds() and "within" in check.describe()


@pytest.mark.parametrize("factor, holds", [(1.0, True), (1.29, True), (0.75, True), (1.31, False),
                                           (0.6, False), (1 / 7.5, False), (7.5, False)])
def test_recheck_holds_within_30_percent(factor, holds):
    p = LatencyProfile.from_pairs(grid_points())
    check = recheck_profile(p, lambda b, c: hinge(b * c) * factor, warmup=0)
    assert check.off_by == pytest.approx(abs(factor - 1))
    assert check.holds() is holds


def test_recheck_ignores_one_stray_slow_step():
    p = LatencyProfile.from_pairs(grid_points())
    slow = recheck_cells(p)[1]
    check = recheck_profile(p, lambda b, c: hinge(b * c) * (20.0 if (b, c) == slow else 1.0), warmup=0)
    assert check.holds()


@pytest.fixture
def device_speed(monkeypatch):
    """The runner's timed step replaced by the hinge curve times ``speed["factor"]`` (how fast
    the device is today), so what is measured at start does not depend on this machine's load."""
    speed = {"factor": 1.0, "calls": 0}

    def make_step_fn(engine, context: int = 256, repeats: int = 3):
        def step(batch: int, chunk: int) -> float:
            speed["calls"] += 1
            return hinge(batch * chunk) * speed["factor"]
        return step

    monkeypatch.setattr("optimus.executor.timed_step.make_step_fn", make_step_fn)
    return speed


def _stub_engine(tmp_path, profile_path=None, block_size=32):
    """What the elastic set-up reads of an engine: device, config, model path, dtype, family, block."""
    from types import SimpleNamespace

    import torch

    loaded = SimpleNamespace(path=tmp_path / "tiny-sdar", model=torch.nn.Linear(1, 1))
    config = SimpleNamespace(profile_path=profile_path, scheduler=SimpleNamespace(max_running=256))
    return SimpleNamespace(device=torch.device("cpu"), config=config, loaded=loaded,
                           spec=SimpleNamespace(family="sdar", arch=SimpleNamespace(moe=None)), block_size=block_size)


def _cached(engine, slowdown: float, path=None, device: str | None = None):
    """A profile saved earlier, its steps ``slowdown`` x today's: where the engine looks for it."""
    from optimus.policy.elastic.setup import device_name, model_id

    pairs = [(b * c, hinge(b * c) * slowdown, b) for b in (1, 4, 16) for c in (1, 4, 16, 32)]
    profile = LatencyProfile.from_pairs(pairs, device=device or device_name(engine.device), model_id=model_id(engine),
                                        created=1.0e9, context=64, source="start-up")
    return profile.save(path or default_profile_path(profile.device, profile.model_id))


def test_first_start_measures_saves_and_says_so(tmp_path, monkeypatch, device_speed, caplog):
    from optimus.policy.elastic.setup import load_or_profile

    monkeypatch.setenv("OPTIMUS_CACHE", str(tmp_path / "cache"))
    engine = _stub_engine(tmp_path)
    with caplog.at_level("INFO", logger="optimus.policy.elastic.setup"):
        profile = load_or_profile(engine)
    saved = LatencyProfile.load(next((tmp_path / "cache" / "profiles").glob("*.json")))
    assert saved.points == profile.points and (saved.source, saved.context) == ("start-up", 64)
    assert profile.fit.t0 == pytest.approx(0.010, rel=0.01)
    assert "latency profile: measuring 12 steps" in caplog.text and "by start-up" in caplog.text


def test_a_start_up_profile_times_no_chunk_wider_than_the_block(tmp_path, monkeypatch, device_speed, caplog):
    from optimus.policy.elastic.setup import load_or_profile

    monkeypatch.setenv("OPTIMUS_CACHE", str(tmp_path / "cache"))
    with caplog.at_level("INFO", logger="optimus.policy.elastic.setup"):
        profile = load_or_profile(_stub_engine(tmp_path, block_size=4))
    assert max(p.tokens / p.batch for p in profile.points) == 4
    assert "latency profile: measuring 6 steps" in caplog.text  # batches 1, 4, 16 x chunks 1, 4


def test_a_cached_profile_that_still_holds_is_reused_and_named(tmp_path, monkeypatch, device_speed, caplog):
    from optimus.policy.elastic.setup import load_or_profile

    monkeypatch.setenv("OPTIMUS_CACHE", str(tmp_path / "cache"))
    engine = _stub_engine(tmp_path)
    path = _cached(engine, slowdown=1.2)  # within 30% of today's steps
    with caplog.at_level("INFO", logger="optimus.policy.elastic.setup"):
        profile = load_or_profile(engine)
    assert profile.created == 1.0e9 and profile.fit.t0 == pytest.approx(0.012, rel=0.01)
    assert device_speed["calls"] == 6  # three steps, each once untimed and once timed
    assert f"latency profile: {path} (measured " in caplog.text and "re-checked at start" in caplog.text
    assert "within the 30% tolerance" in caplog.text and "measuring" not in caplog.text


def test_a_profile_cached_while_busy_is_re_measured(tmp_path, monkeypatch, device_speed, caplog):
    from optimus.policy.elastic.setup import load_or_profile

    monkeypatch.setenv("OPTIMUS_CACHE", str(tmp_path / "cache"))
    engine = _stub_engine(tmp_path)
    path = _cached(engine, slowdown=7.5)  # measured while the machine was busy
    with caplog.at_level("INFO", logger="optimus.policy.elastic.setup"):
        profile = load_or_profile(engine)
    assert profile.created > 1.0e9 and profile.fit.t0 == pytest.approx(0.010, rel=0.01)
    assert LatencyProfile.load(path).points == profile.points  # the cache now holds the new one
    assert "0.13x the cached times (off by 87%, over the 30% tolerance); re-measuring" in caplog.text


def test_a_named_profile_is_kept_even_when_off(tmp_path, device_speed, caplog):
    from optimus.policy.elastic.setup import load_or_profile

    named = tmp_path / "mine.json"
    engine = _stub_engine(tmp_path, profile_path=str(named))
    _cached(engine, slowdown=3.0, path=named)
    with caplog.at_level("INFO", logger="optimus.policy.elastic.setup"):
        profile = load_or_profile(engine)
    assert profile.created == 1.0e9 and LatencyProfile.load(named).created == 1.0e9
    assert "using it anyway, as --profile-path names it" in caplog.text


def test_a_profile_from_another_device_is_used_as_given(tmp_path, device_speed, caplog):
    from optimus.policy.elastic.setup import load_or_profile

    named = tmp_path / "h100.json"
    engine = _stub_engine(tmp_path, profile_path=str(named))
    _cached(engine, slowdown=3.0, path=named, device="NVIDIA H100 80GB HBM3")
    with caplog.at_level("INFO", logger="optimus.policy.elastic.setup"):
        profile = load_or_profile(engine)
    assert profile.device == "NVIDIA H100 80GB HBM3" and device_speed["calls"] == 0
    assert "not re-checked: it is not from this device" in caplog.text


def test_an_unreadable_cache_entry_is_measured_again(tmp_path, monkeypatch, device_speed, caplog):
    from optimus.policy.elastic.setup import load_or_profile

    monkeypatch.setenv("OPTIMUS_CACHE", str(tmp_path / "cache"))
    engine = _stub_engine(tmp_path)
    path = _cached(engine, slowdown=1.0)
    path.write_text("{not json")
    with caplog.at_level("INFO", logger="optimus.policy.elastic.setup"):
        profile = load_or_profile(engine)
    assert profile.source == "start-up" and LatencyProfile.load(path).points == profile.points
    assert "is unreadable" in caplog.text


def test_engine_start_names_its_profile(tiny_checkpoint, tmp_path, monkeypatch, device_speed, caplog):
    """A real engine with the elastic policy: its first start measures and saves a profile,
    the next re-checks it and plans with it."""
    from optimus.config import engine_config
    from optimus.engine.engine import Engine

    monkeypatch.setenv("OPTIMUS_CACHE", str(tmp_path / "cache"))
    config = engine_config(model=str(tiny_checkpoint("sdar")), device="cpu", policy="elastic", num_pages=64)
    with caplog.at_level("INFO", logger="optimus.policy.elastic.setup"):
        first = Engine(config).policy.profile
        assert "latency profile: measuring 6 steps" in caplog.text and first.source == "start-up"  # block 4: chunks 1, 4
        caplog.clear()
        second = Engine(config).policy.profile
    assert second.points == first.points and second.created == first.created
    assert "re-checked at start" in caplog.text and "measuring" not in caplog.text


# ---- optimus profile: reuse and --force ------------------------------------------------------------
def test_profile_command_keeps_a_covering_profile_unless_forced(tiny_checkpoint, tmp_path, capsys, device_speed):
    from optimus.cli import main

    out = tmp_path / "p.json"
    args = ["profile", "--model", str(tiny_checkpoint("sdar")), "--batches", "1,2", "--chunks", "1,4",
            "--context", "16", "--warmup", "0", "--repeats", "1", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    first = LatencyProfile.load(out)
    assert (first.source, first.context) == ("optimus profile", 16) and "saved" in capsys.readouterr().out
    assert main(args) == 0  # same grid, same device speed: kept
    assert "still matches this device" in capsys.readouterr().out
    assert LatencyProfile.load(out).created == first.created
    assert main(args + ["--force"]) == 0
    assert "saved" in capsys.readouterr().out and LatencyProfile.load(out).created > first.created
    device_speed["factor"] = 2.0  # the device got slower: re-measured without --force
    assert main(args) == 0
    assert "no longer matches this device" in capsys.readouterr().out
    assert LatencyProfile.load(out).fit.t0 == pytest.approx(2 * first.fit.t0, rel=0.01)
    assert main([a if a != "16" else "32" for a in args]) == 0  # another context: measured
    assert "does not cover this grid" in capsys.readouterr().out
