"""Measures the step-latency curve over a grid of (requests x chunk) and fits its knee, and
re-checks a cached curve against a few fresh timings.

The measurement is a callable ``step_fn(batch, chunk) -> seconds`` (one timed forward of
``batch`` requests with ``chunk`` active rows each against a cached context), so the loop is
independent of how a step is built: the engine passes its real runner
(``optimus.executor.timed_step.make_step_fn``), tests pass a synthetic curve.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable, Sequence

from tqdm.auto import tqdm

from optimus.policy.elastic.latency import LatencyPoint, LatencyProfile

StepFn = Callable[[int, int], float]

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_CHUNKS = (1, 2, 4, 8, 16, 32, 64)
QUICK_BATCHES = (1, 8, 64, 256)
QUICK_CHUNKS = (1, 8, 32)

# A cached profile whose steps now take more than 30% longer or shorter is re-measured: a
# profile saved while the machine was busy would otherwise skew the elastic policy for good.
RECHECK_TOLERANCE = 0.30
RECHECK_CELLS = 3
RECHECK_MAX_TOKENS = 256  # the re-check times only small steps: it runs at every start


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
                    device: str = "unknown", model_id: str = "unknown",
                    extra_cells: Sequence[tuple[int, int]] = ()) -> LatencyProfile:
    """Time every grid cell (and ``extra_cells``, (batch, chunk) each) ``warmup`` times untimed,
    then ``repeats`` times; each point is the median of the repeats (robust to a stray slow
    step). Returns the fitted profile."""
    if warmup < 0 or repeats < 1:
        raise ValueError("profiling needs warmup >= 0 and repeats >= 1")
    points = []
    cells = grid_cells(batches, chunks, max_tokens)
    cells += [cell for cell in extra_cells if cell not in cells]
    for batch, chunk in tqdm(cells, desc="profiling step latency", unit="step",
                             disable=not progress):
        for _ in range(warmup):
            step_fn(batch, chunk)
        seconds = statistics.median(float(step_fn(batch, chunk)) for _ in range(repeats))
        if not seconds > 0:
            raise ValueError(f"step function returned {seconds} s for batch {batch} x chunk {chunk}")
        points.append(LatencyPoint(batch * chunk, seconds, batch))
    return LatencyProfile(tuple(points), device=device, model_id=model_id)


@dataclass(frozen=True)
class ProfileCheck:
    """Fresh timings of a few of a cached profile's own steps, against the profile."""

    cells: tuple[tuple[int, int], ...]  # (batch, chunk) steps timed
    ratio: float  # median over the cells of (seconds now / seconds cached)

    @property
    def off_by(self) -> float:
        """Relative difference of today's step time from the cached one (0.3 = 30%)."""
        return abs(self.ratio - 1.0)

    def holds(self, tolerance: float = RECHECK_TOLERANCE) -> bool:
        return self.off_by <= tolerance

    def describe(self) -> str:
        verdict = "within" if self.holds() else "over"
        return (f"{len(self.cells)} steps timed now take {self.ratio:.2f}x the cached times "
                f"(off by {100 * self.off_by:.0f}%, {verdict} the {100 * RECHECK_TOLERANCE:.0f}% tolerance)")


def recheck_cells(profile: LatencyProfile, count: int = RECHECK_CELLS,
                  max_tokens: int = RECHECK_MAX_TOKENS) -> list[tuple[int, int]]:
    """Up to ``count`` measured steps of ``profile`` spread over its small ones (the smallest,
    the largest under ``max_tokens`` and between): cheap, and a busy machine slows all of them."""
    cells = profile.cells()
    small = [bc for bc in cells if bc[0] * bc[1] <= max_tokens] or cells[:1]
    if len(small) <= count:
        return small
    picks = sorted({round(i * (len(small) - 1) / (count - 1)) for i in range(count)}) if count > 1 else [0]
    return [small[i] for i in picks]


def recheck_profile(profile: LatencyProfile, step_fn: StepFn, count: int = RECHECK_CELLS,
                    warmup: int = 1) -> ProfileCheck:
    """Time a few of the profile's own steps now and compare. The median of the per-step
    ratios: one step slowed by a passing load does not condemn the whole profile."""
    cells = recheck_cells(profile, count)
    ratios = []
    for batch, chunk in cells:
        for _ in range(warmup):  # first calls compile kernels or capture graphs
            step_fn(batch, chunk)
        seconds = float(step_fn(batch, chunk))
        if not seconds > 0:
            raise ValueError(f"step function returned {seconds} s for batch {batch} x chunk {chunk}")
        ratios.append(seconds / profile.measured(batch, chunk))
    return ProfileCheck(tuple(cells), statistics.median(ratios))
