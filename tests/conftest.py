"""Shared fixtures: tiny random checkpoints and models of every family (CPU, milliseconds)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import pytest
import torch

from optimus.testing import FAMILIES, make_tiny_checkpoint, make_tiny_model

# Latency profiles the engine measures on first start go to a throwaway cache, not ~/.cache.
os.environ.setdefault("OPTIMUS_CACHE", tempfile.mkdtemp(prefix="optimus-test-cache-"))

ALL_FAMILIES = tuple(FAMILIES)
DIFFUSION_FAMILIES = ("llada", "dream", "sdar")


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``tiny_checkpoint(family, shards=1, dtype="float32", seed=0, **config_overrides)``
    writes a fresh checkpoint directory under the test's tmp_path and returns it."""
    counter = iter(range(1_000_000))

    def make(family: str, **kwargs) -> Path:
        return make_tiny_checkpoint(tmp_path / f"{family}-{next(counter)}", family, **kwargs)

    return make


@pytest.fixture
def tiny_model() -> Callable[..., tuple]:
    """Factory: ``tiny_model(family, seed=0, dtype="float32", **config_overrides) -> (DecoderLM, ModelSpec)``."""
    return make_tiny_model
