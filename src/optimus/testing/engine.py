"""Tiny random models loaded through the real loader, for engine, server and bench tests."""

from __future__ import annotations

import tempfile
from pathlib import Path

from optimus.testing.checkpoints import make_tiny_checkpoint


def tiny_loaded(family: str, directory: str | Path | None = None, **overrides):
    """Write a tiny checkpoint of ``family`` and load it on the CPU in fp32 (a LoadedModel)."""
    from optimus.loader import load_model

    root = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="optimus-tiny-"))
    path = make_tiny_checkpoint(root / family, family, **overrides)
    return load_model(path, dtype="float32", device="cpu", progress=False)
