"""Experiment switches: kernel choices that A/B benchmarks and checks vary, in one typed place.

Product options are in the config tree (``optimus.config``) and on the command line; these are
not. Code reads ``active()`` at the moment it launches or captures a kernel (a CUDA graph keeps
what it was captured with); experiments change them only inside ``override(...)``, which
restores them on exit."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Toggles:
    pdl: bool = True  # programmatic dependent launch of every Triton kernel on Hopper
    skinny_max_rows: int = 16  # steps of at most this many rows use the weight-streaming linear
    greedy_backend: str = "auto"  # the fused greedy pick: auto (Triton on CUDA) | torch
    model_kernels: str = "auto"  # norm/rotary/SiLU ops of the model: auto | torch | triton


_active = Toggles()


def active() -> Toggles:
    return _active


@contextlib.contextmanager
def override(**changes) -> Iterator[Toggles]:
    """Run the body with ``changes`` applied (unknown names raise TypeError)."""
    global _active
    saved = _active
    _active = dataclasses.replace(_active, **changes)
    try:
        yield _active
    finally:
        _active = saved
