"""Measures the step-latency curve over a grid of (requests x chunk) and fits its knee.

The measurement is a callable ``step_fn(batch, chunk) -> seconds`` (one timed forward of
``batch`` requests with ``chunk`` active rows each against a cached context), so the loop is
independent of how a step is built: the engine passes its real runner
(``optimus.executor.timed_step.make_step_fn``), tests pass a synthetic curve.
"""

from __future__ import annotations

import statistics
from typing import Callable, Sequence

from tqdm.auto import tqdm

from optimus.policy.elastic.latency import LatencyPoint, LatencyProfile

StepFn = Callable[[int, int], float]

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_CHUNKS = (1, 2, 4, 8, 16, 32, 64)
QUICK_BATCHES = (1, 8, 64, 256)
QUICK_CHUNKS = (1, 8, 32)


def grid_cells(batches: Sequence[int], chunks: Sequence[int], max_tokens: int | None = None) -> list[tuple[int, int]]:
    """(batch, chunk) pairs, smallest steps first, skipping steps over ``max_tokens``."""
    if not batches or not chunks or min(batches) < 1 or min(chunks) < 1:
        raise ValueError("profiling needs non-empty lists of batch sizes and chunk sizes, all >= 1")
    cells = sorted({(b, c) for b in batches for c in chunks if max_tokens is None or b * c <= max_tokens},
                   key=lambda bc: (bc[0] * bc[1], bc))
    if not cells:
        raise ValueError(f"every grid step exceeds max_tokens={max_tokens}")
    return cells


def profile_latency(step_fn: StepFn, batches: Sequence[int] = DEFAULT_BATCHES,
                    chunks: Sequence[int] = DEFAULT_CHUNKS, warmup: int = 2, repeats: int = 5,
                    progress: bool = True, max_tokens: int | None = None,
                    device: str = "unknown", model_id: str = "unknown") -> LatencyProfile:
    """Time every grid cell ``warmup`` times untimed, then ``repeats`` times; each point is
    the median of the repeats (robust to a stray slow step). Returns the fitted profile."""
    if warmup < 0 or repeats < 1:
        raise ValueError("profiling needs warmup >= 0 and repeats >= 1")
    points = []
    for batch, chunk in tqdm(grid_cells(batches, chunks, max_tokens), desc="profiling", unit="step",
                             disable=not progress):
        for _ in range(warmup):
            step_fn(batch, chunk)
        seconds = statistics.median(float(step_fn(batch, chunk)) for _ in range(repeats))
        if not seconds > 0:
            raise ValueError(f"step function returned {seconds} s for batch {batch} x chunk {chunk}")
        points.append(LatencyPoint(batch * chunk, seconds, batch))
    return LatencyProfile(tuple(points), device=device, model_id=model_id)
