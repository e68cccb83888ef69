"""Shared fixtures: tiny random checkpoints and models of every family (CPU, milliseconds)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import pytest
import torch

# Without CUDA the Triton kernels run in Triton's interpreter, which must be chosen before
# Triton is first imported (its own library functions are decorated at import time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fixtures import FAMILIES, make_tiny_checkpoint, make_tiny_model  # noqa: E402

# `--model auto` (the CLI's default) stays the shipped 22M model here: the tests never fetch.
os.environ.setdefault("OPTIMUS_AUTO_MODEL", "default")
# Latency profiles the engine measures on first start go to a throwaway cache, not ~/.cache.
os.environ.setdefault("OPTIMUS_CACHE", tempfile.mkdtemp(prefix="optimus-test-cache-"))

ALL_FAMILIES = tuple(FAMILIES)
DIFFUSION_FAMILIES = ("llada", "dream", "sdar")


@pytest.fixture(scope="session")
def triton_device() -> str:
    """Where the Triton kernel tests run: "cuda", or "cpu" under Triton's interpreter (slow:
    tests keep their shapes tiny there)."""
    triton = pytest.importorskip("triton", reason="Triton is not installed")
    if torch.cuda.is_available():
        return "cuda"
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton.language.standard.zeros, InterpretedFunction):
        pytest.skip("no CUDA, and Triton was imported before TRITON_INTERPRET=1 was set, so its "
                    "interpreter cannot run")
    return "cpu"


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
