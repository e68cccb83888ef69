"""Scoring requests and results: plain data in and out of the engine (ids in, floats/ids out).

A scored sequence is ``tokens`` with its first ``context_len`` tokens as the condition; every
later token gets a value. For causal models the value is the model's exact log-probability of
the token given the tokens before it. For diffusion models it is the token's share of a
likelihood estimate of ``tokens[context_len:]`` given ``tokens[:context_len]`` (see
``decoding/likelihood.py``): the shares sum to the estimate. A ``chained`` sequence instead
scores each token as a one-token continuation of the tokens before it (exact, no sampling), so
a sum over any span is a chain-rule sum: what a caller who does not say where its context ends
(lm-eval's echo) needs.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_TOP_N = 20  # alternatives per token, as vLLM's default --max-logprobs


@dataclass(frozen=True)
class ScoreRequest:
    sequences: tuple[tuple[int, ...], ...]
    context_lens: tuple[int, ...]  # per sequence, in [1, len(tokens)): tokens that only condition
    top_n: int = 0  # alternatives per scored token (the scored token itself is always reported)
    seed: int | None = None  # None: the engine's seed; the same request always scores the same
    chained: tuple[bool, ...] = ()  # per sequence (empty: none); see the module doc

    def __post_init__(self) -> None:
        if len(self.sequences) != len(self.context_lens):
            raise ValueError("sequences and context_lens differ in length")
        if self.chained and len(self.chained) != len(self.sequences):
            raise ValueError("chained: one flag per sequence (or none)")
        if not 0 <= self.top_n <= MAX_TOP_N:
            raise ValueError(f"top_n: must be in [0, {MAX_TOP_N}], got {self.top_n}")
        for i, (tokens, ctx) in enumerate(zip(self.sequences, self.context_lens)):
            if not 1 <= ctx < len(tokens):
                raise ValueError(f"sequence {i}: context_len {ctx} must be in [1, {len(tokens)})")

    def is_chained(self, index: int) -> bool:
        return bool(self.chained) and self.chained[index]


@dataclass(frozen=True)
class TokenScores:
    """One sequence: entry ``k`` is about token ``context_len + k``."""

    logprobs: tuple[float, ...]
    top_ids: tuple[tuple[int, ...], ...]  # best first, ``top_n`` per token
    top_logprobs: tuple[tuple[float, ...], ...]  # on the scale of ``logprobs`` (same estimator)


@dataclass(frozen=True)
class ScoreResult:
    sequences: tuple[TokenScores, ...]
    method: str  # "exact" (causal), "block_elbo" (block-causal), "mc" (full attention)
    samples: int  # Monte Carlo samples per estimated sequence (1 for exact; chained sequences take none)
