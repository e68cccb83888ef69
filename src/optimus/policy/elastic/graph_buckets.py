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

A padding row costs less than a real one on an MoE model: it routes to no expert (the router
gives rows past the step's own no expert, docs/models.md), so it pays the attention, the
projections and the shared expert only. ``padded_cost`` is that share of a real row's weight
multiply-adds (:func:`padded_row_cost`; 1 for a dense model). Since padding stopped routing, the
H100 LLaDA2.0-mini sweep's steps (code `804160e`) rose 3-5 us a row within a bucket at 16-128
requests against about 8 us a row from bucket to bucket, where a step priced at its whole bucket
rises 0: priced so, rows up to the bucket's edge looked free, and elastic filled buckets with
larger windows (16 at 64 requests, where fixed:8 ran 3% less device time).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SMALLEST = 8  # the smallest token bucket (executor.cuda_graphs.step_key; a test holds the two alike)


@dataclass(frozen=True)
class GraphBuckets:
    """``limit``: the largest graph's tokens (a power of two: ``GraphedBody.max_tokens``);
    ``padded_cost``: a padding row's cost in real rows (:func:`padded_row_cost`)."""

    limit: int
    padded_cost: float = 1.0

    def __post_init__(self) -> None:
        if self.limit < SMALLEST or self.limit & (self.limit - 1):
            raise ValueError(f"graph limit must be a power of two >= {SMALLEST}, got {self.limit}")
        if not 0.0 <= self.padded_cost <= 1.0:
            raise ValueError(f"a padding row's cost must be in [0, 1] real rows, got {self.padded_cost}")

    def pad(self, tokens: np.ndarray) -> np.ndarray:
        """The rows each step of ``tokens`` [K] pays for, in real rows: its own plus its bucket's
        padding at ``padded_cost`` where a graph serves it, else its own."""
        n = np.asarray(tokens, dtype=float)
        bucket = np.maximum(float(SMALLEST), np.exp2(np.ceil(np.log2(np.maximum(n, 1.0)))))
        return np.where(n <= self.limit, n + self.padded_cost * (bucket - n), n)

    @classmethod
    def of(cls, runner, arch=None) -> "GraphBuckets | None":
        """The buckets a model runner replays (None: no CUDA graphs, every step runs its own
        rows); ``arch`` (the model's ``ArchConfig``) prices their padding rows."""
        graphs = getattr(runner, "graphs", None)
        if graphs is None:
            return None
        return cls(int(graphs.max_tokens), 1.0 if arch is None else padded_row_cost(arch))


def padded_row_cost(arch) -> float:
    """A padding row's share of a real row's weight multiply-adds over the decoder layers: 1 for
    a dense model; on an MoE model its routed experts' are left out (a padding row routes to none).
    Attention over the cache is left out too (it grows with the context, not with the weights)."""
    h, moe = arch.hidden_size, arch.moe
    if moe is None:
        return 1.0
    attention = h * (2 * arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim  # q, k, v, o
    sparse = len(moe.layers)
    shared = attention + h * moe.num_experts + 3 * h * moe.shared_size  # router and shared expert
    routed = 3 * h * moe.expert_size * moe.top_k
    per_layer_dense = attention + 3 * h * arch.intermediate_size
    real = (arch.num_layers - sparse) * per_layer_dense + sparse * (shared + routed)
    padded = (arch.num_layers - sparse) * per_layer_dense + sparse * shared
    return padded / real


def eager_cell(limit: int, batches) -> tuple[int, int] | None:
    """A (batch, chunk) step just past ``limit`` tokens for the profile: the largest batch of
    ``batches`` that divides ``limit`` into at least 8 rows a request, one row more each (at
    most 1/8 past the limit; None if no batch does)."""
    for b in sorted(batches, reverse=True):
        if limit % b == 0 and limit // b >= 8:
            return b, limit // b + 1
    return None
