"""Decoding rules: turn a chunk's logits into proposed tokens, confidences and commits.

Confidence is the softmax probability of the proposed token, computed in fp32 before any
top-k/top-p filtering (SDAR's convention). Every rule commits at least one position.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from optimus.core.params import SamplingParams

if TYPE_CHECKING:
    from optimus.config import EngineConfig

# (confidences of the chunk's masked positions, the request's params, chunk size) -> indices to commit
CommitRule = Callable[[torch.Tensor, SamplingParams, int], torch.Tensor]

# Below this temperature, logits / T overflows; such requests decode greedily.
GREEDY_TEMPERATURE = 1e-5


def propose(logits: torch.Tensor, params: SamplingParams,
            generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n, V] -> (tokens [n], confidence [n]), both on logits' device."""
    logits = logits.float()
    if params.temperature <= GREEDY_TEMPERATURE:
        probs = torch.softmax(logits, dim=-1)
        conf, tokens = probs.max(dim=-1)
        return tokens, conf
    scaled = logits / params.temperature
    probs = torch.softmax(scaled, dim=-1)
    filtered = _filter(scaled, params)
    sample_probs = torch.softmax(filtered, dim=-1)
    if generator is not None:
        draws = torch.multinomial(sample_probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
    else:
        draws = torch.multinomial(sample_probs, 1).squeeze(-1)
    conf = probs.gather(-1, draws[:, None]).squeeze(-1)
    return draws, conf


def _filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > params.top_p  # keep the first token always
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, idx, sorted_logits)
    return logits


def factor_count(conf: torch.Tensor, factor: float) -> int:
    """Fast-dLLM's factor rule (``get_transfer_index_dynamic``): how many of the masked
    positions ``conf`` [n] commit. Ranked by confidence, the n-th (n = 1, 2, ...) passes while
    confidence >= 1 - factor / (n + 1), compared in ``conf``'s dtype; the first always passes.
    The positions before the first failure commit, except that a failure at the *last* candidate
    (or no failure at all) commits every position: Fast-dLLM's scan quirk, kept for parity."""
    n = conf.numel()
    if n <= 1:
        return n
    ranked = torch.sort(conf.flatten(), descending=True)[0]
    bars = torch.tensor([-1.0] + [1.0 - factor / (k + 1) for k in range(2, n + 1)],
                        dtype=ranked.dtype, device=ranked.device)
    failures = torch.nonzero(ranked < bars).flatten()
    first = int(failures[0]) if failures.numel() else n - 1
    return n if first == n - 1 else first


def threshold_mask(conf: torch.Tensor, threshold: float) -> torch.Tensor:
    """Fast-dLLM's threshold rule (``get_transfer_index`` with a threshold): every position of
    ``conf`` [n] with confidence >= threshold (in ``conf``'s dtype), plus always the most
    confident one (``argmax``: the first among equal maxima). -> bool [n]."""
    keep = conf >= threshold
    if conf.numel():
        keep[torch.argmax(conf)] = True
    return keep


def select_commits(conf: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """conf [n] over the chunk's masked positions -> indices to commit (at least one)."""
    n = conf.numel()
    if params.rule == "topk":
        return torch.topk(conf, min(params.tokens_per_step, n)).indices
    if params.rule == "factor":
        return torch.topk(conf, max(1, factor_count(conf, params.factor))).indices
    return torch.nonzero(threshold_mask(conf, params.threshold)).flatten()


def params_rule(conf: torch.Tensor, params: SamplingParams, chunk: int) -> torch.Tensor:
    """The default commit rule: the request's own decoding rule."""
    return select_commits(conf, params)


def commit_rule_for(config: "EngineConfig") -> CommitRule:
    """The engine's commit rule: the requests' own (the default), or, when the config names a
    ``replay_acceptance`` profile (benchmarks of random-weight models: a file, or a regime name
    of :mod:`optimus.decoding.regimes`), that profile replayed."""
    if config.replay_acceptance:
        from optimus.decoding import regimes
        from optimus.decoding.replay import ReplayAcceptance
        return ReplayAcceptance(regimes.load(config.replay_acceptance), seed=config.seed)
    return params_rule
