"""What the elastic controller decided (``Plan``) and the predicted rates it chose from (``Curve``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from optimus.policy.elastic.ladders import Rungs


@dataclass(frozen=True)
class Plan:
    """What the controller decided in its latest step (for statistics and logs)."""

    target_positions: int  # the hysteresis state: planned chunk positions of the elastic requests
    positions: int  # planned chunk positions this step (before clipping to the block ends)
    predicted_tokens: float  # amortised step tokens, P + sum(cost)
    predicted_latency_s: float
    predicted_rate: float  # committed tokens per second
    retargeted: bool


@dataclass(frozen=True)
class Curve:
    """The predicted rate of every allocation along the rungs, before the step's budget
    and hysteresis: what a step's requests, levels and pinned sizes imply under the
    policy's current estimates (so it can be built in observe and looked up in choose)."""

    rungs: Rungs
    tokens: np.ndarray  # [U+1] amortised step tokens
    latency: np.ndarray  # [U+1] predicted seconds, host overhead included
    rate: np.ndarray  # [U+1] committed tokens per second
