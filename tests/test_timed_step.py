"""The latency profiler's synthetic step: its chunk rows look like a decoding window's."""

from __future__ import annotations

import pytest
import torch

from optimus.config import engine_config
from optimus.engine.engine import Engine
from optimus.executor.timed_step import make_step_fn, stored_rows, synthetic_batch


@pytest.fixture(scope="module")
def moe_engine():
    return Engine(engine_config(model="random-tiny:llada2-mini", device="cpu", dtype="float32", policy="fixed:4",
                                num_pages=64))


def _seen_rows(engine, monkeypatch, stored=None, **kwargs) -> torch.Tensor:
    seen = []
    forward = engine.runner.forward

    def spy(batch):
        seen.append(batch.input_ids.clone())
        return forward(batch)

    monkeypatch.setattr(engine.runner, "forward", spy)
    step = make_step_fn(engine, context=16, repeats=1, **kwargs)
    assert step(3, 8, stored) > 0
    return seen[-1]


def test_each_request_stores_a_few_token_rows_then_runs_its_window_of_mask_rows(moe_engine, monkeypatch):
    # An MoE step's cost follows the experts its rows route to: a window's open positions all
    # hold the mask token and route alike, the stored group's committed tokens route apart.
    rows = _seen_rows(moe_engine, monkeypatch).view(3, 8)
    mask = moe_engine.spec.mask_id
    assert stored_rows(8) == 2
    assert torch.all(rows[:, 2:] == mask)
    assert not torch.any(rows[:, :2] == mask)


@pytest.mark.parametrize("stored", [0, 5, 8])
def test_a_step_may_store_any_number_of_its_rows(moe_engine, monkeypatch, stored):
    rows = _seen_rows(moe_engine, monkeypatch, stored=stored).view(3, 8)
    assert torch.all(rows[:, stored:] == moe_engine.spec.mask_id)
    assert not torch.any(rows[:, :stored] == moe_engine.spec.mask_id)


def test_the_stored_rows_experiment_times_every_cell_on_a_cpu(tmp_path):
    import json

    from optimus.bench.experiments import moe_rows

    assert moe_rows.main(["--out", str(tmp_path), "--cpu-tiny", "--batches", "1,2", "--chunks", "8"]) == 0
    cells = json.loads((tmp_path / "moe_rows.json").read_text())["cells"]
    assert [(c["batch"], c["stored"]) for c in cells] == [(b, s) for b in (1, 2) for s in (0, 2, 4, 8)]
    assert all(c["ms"] > 0 for c in cells)


def test_stored_rows_follow_real_commit_rates():
    # C + tau(C) rows a step, tau from the real-8b regime: ar (1 + 1), C = 8 (8 + 1.89),
    # C = 32 (32 + 2.68); a single row is an open window alone
    assert [stored_rows(r) for r in (1, 2, 10, 35)] == [0, 1, 2, 3]


def test_random_rows_on_request(moe_engine, monkeypatch):
    rows = _seen_rows(moe_engine, monkeypatch, random_rows=True)
    assert rows.shape == (24,)
    assert len(set(rows.tolist())) > 1


def test_each_request_attends_to_a_context_of_its_own(moe_engine):
    # Requests over one shared context run the same hidden states: their mask rows route to the
    # same few experts, where real requests' reach many more.
    from optimus.executor.timed_step import context_batch, context_pages

    table = context_pages(3, 40, page_size=16, num_pages=64, device=torch.device("cpu"))
    assert table.shape == (3, 3) and len(set(table.flatten().tolist())) == 9  # 3 pages each, none shared
    prefill = context_batch(3, 40, 16, 64, torch.device("cpu"), vocab=1000, avoid_id=7)
    assert prefill.slots.unique().numel() == 120 and not torch.any(prefill.input_ids == 7)
    assert context_pages(8, 40, page_size=16, num_pages=10, device=torch.device("cpu")).max() < 9  # shared when short


def test_a_graphs_padding_rows_read_no_expert(moe_engine, monkeypatch):
    """A step padded to a CUDA-graph bucket (rows past cu_q[-1], owned by no request): the MoE
    layers route the padding to no expert (id E), and the live rows' hidden states are those of
    the unpadded step. Routed as tokens, padding read up to k experts a row (on the H100, 24
    padding rows made a 4-request LLaDA2.0-mini step 1.6x slower)."""
    from dataclasses import replace

    from optimus.models import moe

    runner = moe_engine.runner
    live = synthetic_batch(2, 4, 8, runner.page_size, moe_engine.allocator.num_pages, runner.device,
                           moe_engine.spec.arch.vocab_size, moe_engine.spec.mask_id)
    pad = 5
    padded = replace(live, input_ids=torch.cat([live.input_ids, torch.arange(pad) * 7 + 3]),
                     positions=torch.cat([live.positions, torch.zeros(pad, dtype=live.positions.dtype)]),
                     groups=torch.cat([live.groups, torch.zeros(pad, dtype=live.groups.dtype)]),
                     slots=torch.cat([live.slots, torch.full((pad,), -1, dtype=live.slots.dtype)]))
    routed = []
    fused = moe.fused_moe
    monkeypatch.setattr(moe, "fused_moe", lambda x, w13, w2, weights, ids, backend: routed.append(ids.clone())
                        or fused(x, w13, w2, weights, ids, backend))
    with torch.inference_mode():
        want = runner.forward(live)
        unpadded_routes = list(routed)
        routed.clear()
        got = runner.forward(padded)
    experts = moe_engine.spec.arch.moe.num_experts
    assert routed and len(routed) == len(unpadded_routes)
    for ids, unpadded in zip(routed, unpadded_routes):
        assert (ids[-pad:] == experts).all()
        assert ids[:-pad].tolist() == unpadded.tolist()
    torch.testing.assert_close(got[:-pad], want)
