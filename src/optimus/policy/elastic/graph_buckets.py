"""What a step costs when CUDA graphs serve it: the graph of its bucket, not its own rows.

The runner replays a step of ``n`` tokens from the graph captured for the next power of two
(at least 8; ``executor.cuda_graphs.step_key``), its rows padded up to it, as long as ``n`` fits
the largest graph; a larger step runs eagerly, launch by launch. So on a GPU a step's time is a
staircase in its rows, not the line between the profile's points: the profile times steps at
powers of two (batch x chunk), which are bucket sizes, and interpolating between them prices
1,152 rows below the 2,048-row bucket they pay for. On the LLaDA2.0-mini shape (H100, 64
requests, graphs to 2,048 tokens) steps of 1,152 and 1,872 rows both took 27-28 ms, the
profile's 2,048-row point 27.3, while interpolation put 1,152 rows at about 22 ms; steps of
2,062-2,174 rows ran eagerly at 67-69 ms. The policy prices each step at its bucket
(:meth:`GraphBuckets.pad`); past the largest graph, at its own rows on the profile's eager
points (the start-up profile times one step just past the limit: ``eager_cell``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SMALLEST = 8  # the smallest token bucket (executor.cuda_graphs.step_key; a test holds the two alike)


@dataclass(frozen=True)
class GraphBuckets:
    """``limit``: the largest graph's tokens (a power of two: ``GraphedBody.max_tokens``)."""

    limit: int

    def __post_init__(self) -> None:
        if self.limit < SMALLEST or self.limit & (self.limit - 1):
            raise ValueError(f"graph limit must be a power of two >= {SMALLEST}, got {self.limit}")

    def pad(self, tokens: np.ndarray) -> np.ndarray:
        """The rows each step of ``tokens`` [K] runs: its bucket where a graph serves it, else its own."""
        n = np.asarray(tokens, dtype=float)
        return np.where(n <= self.limit, self.key(n), n)

    def key(self, tokens: np.ndarray) -> np.ndarray:
        """What :class:`BucketMemory` keeps steps of ``tokens`` [K] under: the power of two at or
        above them, their graph's bucket where one serves them; past the limit, the band of eager
        steps up to it (their launches pace them: on an H100, eager LLaDA-8B dual-cache steps of
        520-592 rows took 16-39 ms where the 512-row graph takes 14)."""
        n = np.asarray(tokens, dtype=float)
        return np.maximum(float(SMALLEST), np.exp2(np.ceil(np.log2(np.maximum(n, 1.0)))))

    @classmethod
    def of(cls, runner) -> "GraphBuckets | None":
        """The buckets a model runner replays (None: no CUDA graphs, every step runs its own rows)."""
        graphs = getattr(runner, "graphs", None)
        return None if graphs is None else cls(int(graphs.max_tokens))


def eager_cell(limit: int, batches) -> tuple[int, int] | None:
    """A (batch, chunk) step just past ``limit`` tokens for the profile: the largest batch of
    ``batches`` that divides ``limit`` into at least 8 rows a request, one row more each (at
    most 1/8 past the limit; None if no batch does)."""
    for b in sorted(batches, reverse=True):
        if limit % b == 0 and limit // b >= 8:
            return b, limit // b + 1
    return None
