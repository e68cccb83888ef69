"""The latency model of mixture-of-experts steps: expected experts touched, the non-negative
fit, and the profile that shapes its curves by them."""

import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch

from optimus.bench import latency_fit
from optimus.models.moe import route
from optimus.models.shapes import shape_config
from optimus.models.registry import spec_from_config
from optimus.models.spec import MoEConfig
from optimus.policy.elastic.experts import ExpertCostModel, ExpertRouting, nonnegative_least_squares
from optimus.policy.elastic.latency import LatencyProfile
from optimus.policy.elastic.setup import with_routing

LLADA2 = ExpertRouting(256, 8)
# A step on an LLaDA2.0-mini-like device: 0.5 ms fixed, 7 ms to read every expert once, 2 us
# per token, 10 us per request.
TRUE = ExpertCostModel(LLADA2, a=0.5e-3, w=7e-3, c=2e-6, d=1e-5)
BATCHES, CHUNKS = (1, 4, 16, 64), (1, 4, 16, 32)


def surface(model=TRUE, batches=BATCHES, chunks=CHUNKS, routing=LLADA2) -> LatencyProfile:
    pairs = [(b * c, float(model(b * c, b)), b) for b in batches for c in chunks]
    return LatencyProfile.from_pairs(pairs, routing=routing)


def test_touched_experts_limits():
    r = ExpertRouting(256, 8)
    assert r.touched(0) == 0
    assert r.touched(1) == pytest.approx(8)
    assert r.touched(32) == pytest.approx(256 * (1 - (31 / 32) ** 32))
    assert r.touched(10_000) == pytest.approx(256)
    assert ExpertRouting(4, 4).touched(np.array([0, 1, 7])).tolist() == [0, 4, 4]
    with pytest.raises(ValueError):
        ExpertRouting(8, 9)


@pytest.mark.parametrize("cfg", [
    MoEConfig(num_experts=64, top_k=4, expert_size=8, layers=(0,)),
    MoEConfig(num_experts=64, top_k=4, expert_size=8, layers=(0,), scoring="sigmoid", n_group=8, topk_group=4),
])
def test_touched_matches_the_router_on_random_scores(cfg):
    """The formula is the expectation for exchangeable router scores, group-limited too."""
    gen = torch.Generator().manual_seed(0)
    r = ExpertRouting(cfg.num_experts, cfg.top_k)
    for n in (1, 3, 12, 40):
        counts = [route(torch.randn(n, cfg.num_experts, generator=gen), cfg)[1].unique().numel() for _ in range(300)]
        assert np.mean(counts) == pytest.approx(float(r.touched(n)), rel=0.03)


def test_nonnegative_least_squares_is_the_constrained_optimum():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4))
    y = x @ np.array([1.0, -2.0, 0.5, 0.0]) + rng.normal(scale=0.1, size=40)
    beta = np.array(nonnegative_least_squares(x, y))
    assert (beta >= 0).all() and beta[1] == 0
    best = np.sum((x @ beta - y) ** 2)
    for _ in range(2000):  # no non-negative point does better
        other = np.abs(beta + rng.normal(scale=0.3, size=4)) * (rng.random(4) > 0.2)
        assert np.sum((x @ other - y) ** 2) >= best - 1e-9


def test_the_fit_recovers_a_known_surface():
    p = surface()
    fitted = ExpertCostModel.fit(LLADA2, np.array([q.tokens for q in p.points]),
                                 np.array([q.batch for q in p.points]), np.array([q.seconds for q in p.points]))
    for k in ExpertCostModel.FEATURES:
        assert getattr(fitted, k) == pytest.approx(getattr(TRUE, k), rel=1e-6, abs=1e-12)


def test_the_profile_is_exact_at_its_points_and_follows_experts_between():
    moe = surface()
    dense_view = dataclasses.replace(moe, routing=None)
    for q in moe.points:
        assert moe.predict(q.tokens, q.batch) == pytest.approx(q.seconds, rel=1e-9)
    worst_moe = worst_tokens = 0.0
    for b, c in itertools.product((1, 2, 3, 8, 32, 256), (2, 3, 8, 12, 24, 48)):
        truth = float(TRUE(b * c, b))
        worst_moe = max(worst_moe, abs(moe.predict(b * c, b) / truth - 1))
        worst_tokens = max(worst_tokens, abs(dense_view.predict(b * c, b) / truth - 1))
    assert worst_moe < 0.01  # off the grid, between chunks, past the largest chunk and batch
    assert worst_tokens > 0.10  # straight lines in tokens and the hinge miss the expert curve


def test_a_dense_profile_plans_as_before():
    pairs = [(n, 0.01 + 1e-5 * max(0, n - 200), b) for b in (1, 8) for n in (b, 8 * b, 32 * b)]
    plain = LatencyProfile.from_pairs(pairs)
    assert plain.cost_model is None
    # straight between points, the hinge above the range
    assert plain.predict(20, 1) == pytest.approx(np.interp(20, [1, 8, 32], [0.01, 0.01, 0.01]))
    last = 0.01 + 1e-5 * (256 - 200)  # batch 8's largest step
    assert plain.predict(512, 8) == pytest.approx(last * plain.fit(512) / plain.fit(256))


def test_routing_survives_the_json_round_trip(tmp_path):
    p = surface()
    back = LatencyProfile.load(p.save(tmp_path / "p.json"))
    assert back.routing == LLADA2
    assert back.predict(24, 3) == pytest.approx(p.predict(24, 3))
    data = json.loads((tmp_path / "p.json").read_text())
    del data["routing"]  # a profile saved before routing was recorded: dense
    assert LatencyProfile.from_json(data).routing is None


def test_with_routing_names_an_moe_models_experts_only():
    moe_spec = spec_from_config(shape_config("llada2-mini", tiny=True))
    dense_spec = spec_from_config(shape_config("sdar-8b", tiny=True))
    plain = dataclasses.replace(surface(), routing=None)
    assert with_routing(plain, moe_spec).routing == ExpertRouting(8, 2)
    assert with_routing(plain, dense_spec) is plain


def test_held_out_evaluation_ranks_the_expert_model_first_on_an_expert_surface():
    report = latency_fit.evaluate(surface(batches=(1, 2, 4, 8), chunks=(1, 2, 4, 8, 16, 32)))
    for where in ("interior", "beyond"):
        s = report["summary"][where]
        assert s["experts"]["max_abs"] < 0.01 and s["expert model"]["max_abs"] < 1e-6
        assert s["tokens"]["max_abs"] > 0.05
    assert report["fits"]["expert model"]["w"] == pytest.approx(TRUE.w)


def test_bench_latency_fit_runs_on_a_tiny_moe(tmp_path):
    args = latency_fit.argparse.ArgumentParser()
    latency_fit.add_arguments(args)
    ns = args.parse_args(["--shape", "llada2-mini", "--tiny", "--device", "cpu", "--batches", "1,2",
                          "--chunks", "1,2,4", "--repeats", "1", "--context", "16", "--out", str(tmp_path)])
    assert latency_fit.run(ns) == 0
    report = json.loads((tmp_path / "latency_fit.json").read_text())
    assert report["fits"]["routing"] == {"experts": 8, "top_k": 2}
    assert {r["where"] for r in report["held_out"]} == {"interior", "beyond"}
    assert set(report["summary"]["beyond"]) == set(latency_fit.METHODS)
    assert (tmp_path / "latency_fit.png").stat().st_size > 0


def test_elastic_on_an_moe_surface_keeps_chunks_small_until_every_expert_is_read():
    """Under few commits per forward (the real-8b tau), a batch-1 MoE step that reads 8
    experts at C = 1 and 163 at C = 32 makes C = 1 the best rate, where a flat dense curve
    makes C = 32 best; once the batch touches every expert anyway, large chunks pay again."""
    from optimus.policy import RequestView, StepView
    from optimus.policy.elastic.controller import ElasticPolicy

    tau = {1: 1.0, 2: 1.24, 4: 1.56, 8: 1.89, 16: 2.27, 32: 2.68}

    def chosen(profile, n):
        view = StepView(tuple(RequestView(f"r{i}", 32, 32, None) for i in range(n)), 0, 8192)
        return set(ElasticPolicy(profile=profile, tau_prior=tau).choose(view))

    moe = surface(chunks=(1, 2, 4, 8, 16, 32))
    assert chosen(moe, 1) == {1}
    assert min(chosen(moe, 16)) >= 16
    assert chosen(LatencyProfile.synthetic(5e-3, 256, 2e-5), 1) == {32}


@pytest.mark.parametrize("experts", [True, False])
def test_a_batch_per_column_predicts_as_one_batch_at_a_time(experts):
    """What a latency refit asks for: a grid of token counts over steps of many batches."""
    profile = surface() if experts else dataclasses.replace(surface(), routing=None)
    rng = np.random.default_rng(0)
    batch = rng.integers(1, 400, 60)  # below, between, on and above the grid's batches
    batch[:4] = (1, 16, 64, 300)
    n = rng.uniform(1, 3000, (5, 60))
    each = np.array([[profile.predict(n[i, j], int(batch[j])) for j in range(60)] for i in range(5)])
    assert profile.predict_many(n, batch) == pytest.approx(each, rel=1e-12)
    assert profile.predict_many(n[0], batch) == pytest.approx(each[0], rel=1e-12)
