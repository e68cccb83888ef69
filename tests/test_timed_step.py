"""The latency profiler's synthetic step: its chunk rows look like a decoding window's."""

from __future__ import annotations

import pytest
import torch

from optimus.config import engine_config
from optimus.engine.engine import Engine
from optimus.executor.timed_step import make_step_fn


@pytest.fixture(scope="module")
def moe_engine():
    return Engine(engine_config(model="random-tiny:llada2-mini", device="cpu", dtype="float32", policy="fixed:4",
                                num_pages=64))


def _seen_rows(engine, monkeypatch, **kwargs) -> torch.Tensor:
    seen = []
    forward = engine.runner.forward

    def spy(batch):
        seen.append(batch.input_ids.clone())
        return forward(batch)

    monkeypatch.setattr(engine.runner, "forward", spy)
    step = make_step_fn(engine, context=16, repeats=1, **kwargs)
    assert step(3, 8) > 0
    return seen[-1]


def test_chunk_rows_hold_the_mask_id(moe_engine, monkeypatch):
    # An MoE step's cost follows the experts its rows route to: a window's open positions all
    # hold the mask token, so the profile must time those rows, not random tokens.
    rows = _seen_rows(moe_engine, monkeypatch)
    assert rows.shape == (24,)
    assert torch.all(rows == moe_engine.spec.mask_id)


def test_random_rows_on_request(moe_engine, monkeypatch):
    rows = _seen_rows(moe_engine, monkeypatch, random_rows=True)
    assert rows.shape == (24,)
    assert len(set(rows.tolist())) > 1
