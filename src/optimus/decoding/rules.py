"""Decoding rules: turn a chunk's logits into proposed tokens, confidences and commits.

Confidence is the softmax probability of the proposed token, computed in fp32 before any
top-k/top-p filtering (SDAR's convention). Every rule commits at least one position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from optimus.core.params import SamplingParams

if TYPE_CHECKING:
    from optimus.config import EngineConfig

# (confidences of the chunk's masked positions, the request's params, chunk size) -> indices to commit
CommitRule = Callable[[torch.Tensor, SamplingParams, int], torch.Tensor]

# Below this temperature, logits / T overflows; such requests decode greedily.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class RowDraws:
    """Per-row sampling parameters of a batch of logit rows (all [n], on the logits' device).

    Sampled rows draw Gumbel noise from a counter-based hash of (seed, position, draw, token),
    so a request's draws depend on its seed and where it is, never on which other requests
    share the batch or on a generator's call order; rows at temperature 0 are greedy."""

    temperature: torch.Tensor  # float
    top_k: torch.Tensor  # int64, 0 = off
    top_p: torch.Tensor  # float, 1 = off
    seed: torch.Tensor  # int64
    position: torch.Tensor  # int64: the row's canvas position
    draw: torch.Tensor  # int64: how many times the request has drawn before (diffusion re-proposes)

    @classmethod
    def of(cls, rows: list[tuple[SamplingParams, int, int]], device) -> "RowDraws":
        """rows: (params, position, draw) per logit row."""
        def col(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)
        return cls(col([p.temperature for p, _, _ in rows], torch.float32),
                   col([p.top_k for p, _, _ in rows], torch.int64),
                   col([p.top_p for p, _, _ in rows], torch.float32),
                   col([p.seed or 0 for p, _, _ in rows], torch.int64),
                   col([q for _, q, _ in rows], torch.int64), col([d for _, _, d in rows], torch.int64))


def propose(logits: torch.Tensor, draws: RowDraws) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n, V] -> (tokens [n], confidence [n]), both on logits' device.

    Confidence is the proposed token's probability at the row's temperature, before top-k/top-p."""
    logits = logits.float()
    greedy = draws.temperature <= GREEDY_TEMPERATURE
    scaled = logits / torch.where(greedy, 1.0, draws.temperature)[:, None]
    probs = torch.softmax(scaled, dim=-1)
    if bool(greedy.all()):
        conf, tokens = probs.max(dim=-1)
        return tokens, conf
    noisy = _filter(scaled, draws) + gumbel_noise(draws, logits.shape[-1])
    tokens = torch.where(greedy, scaled.argmax(dim=-1), noisy.argmax(dim=-1))
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1)


def _filter(scaled: torch.Tensor, draws: RowDraws) -> torch.Tensor:
    """Top-k, then top-p over what top-k kept (the first token always stays). Equal logits are
    ranked by id (a stable sort): at the top-k or top-p boundary the lower ids stay, on every
    device, as the vocabulary-parallel draw (parallel/sampling.py) keeps them."""
    if not bool(((draws.top_k > 0) | (draws.top_p < 1.0)).any()):
        return scaled
    vocab = scaled.shape[-1]
    ordered, idx = torch.sort(scaled, descending=True, dim=-1, stable=True)
    rank = torch.arange(vocab, device=scaled.device)[None, :]
    k = torch.where(draws.top_k > 0, draws.top_k.clamp(max=vocab), vocab)[:, None]
    ordered = ordered.masked_fill(rank >= k, float("-inf"))
    p = torch.softmax(ordered, dim=-1)
    # Only rows with top-p: in fp32 the cumulative sum can pass 1.0 before the end, and a
    # top-p 1 row batched with filtering rows would lose its tail (its draw would depend on
    # which rows share its batch).
    nucleus = (p.cumsum(-1) - p > draws.top_p[:, None]) & (draws.top_p < 1.0)[:, None]
    ordered = ordered.masked_fill(nucleus, float("-inf"))
    return torch.empty_like(scaled).scatter_(-1, idx, ordered)


_M1, _M2 = 0xBF58476D1CE4E5B9 - (1 << 64), 0x94D049BB133111EB - (1 << 64)  # splitmix64, as int64
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch shifts arithmetically)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def gumbel_noise(draws: RowDraws, vocab: int) -> torch.Tensor:
    """[n, V] standard Gumbel noise, a pure function of (seed, position, draw, token id)."""
    return gumbel_slice(draws, 0, vocab)


def gumbel_slice(draws: RowDraws, lo: int, hi: int) -> torch.Tensor:
    """[n, hi - lo]: columns [lo, hi) of ``gumbel_noise`` (each value depends on its own token
    id only, so a rank holding a vocabulary slice draws exactly the full rows' values there)."""
    key = _mix(_mix(_mix(draws.seed * _GOLDEN + draws.position) + draws.draw))  # [n]
    tokens = torch.arange(lo, hi, device=key.device, dtype=torch.int64)
    bits = _shr(_mix(key[:, None] + tokens[None, :] * _GOLDEN), 40)  # 24 uniform bits
    u = (bits.float() + 0.5) * (1.0 / (1 << 24))  # in (0, 1)
    return -torch.log(-torch.log(u))


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


def keep_many(rule: CommitRule, conf: np.ndarray, lens: np.ndarray, params: Sequence[SamplingParams],
              chunks: Sequence[int]) -> np.ndarray:
    """The commits of many windows at once, as ``rule`` makes them window by window.

    conf: fp32 [M], the windows' masked positions one window after another (``lens[i]`` of
    window i, each >= 1); -> bool [M]. A window of one position commits it without asking the
    rule. The default rule's threshold windows are decided in one vectorised pass over every
    window (a step at 256 requests: one pass instead of 256 small tensor calls); a rule with
    its own ``keep_many`` (a replayed acceptance) decides its windows itself; any other window
    asks the rule alone."""
    starts = np.zeros(lens.size, np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    keep = np.zeros(conf.size, bool)
    pending = lens > 1
    keep[starts[~pending]] = True
    own = getattr(rule, "keep_many", None)
    if own is not None:
        return own(conf, starts, lens, chunks, keep, pending)
    if rule is params_rule and pending.any() and np.isfinite(conf).all():
        by_threshold = pending & np.fromiter((p.rule == "threshold" for p in params), bool, lens.size)
        if by_threshold.any():
            _threshold_many(conf, starts, lens, by_threshold, params, keep)
            pending &= ~by_threshold
    for i in np.flatnonzero(pending).tolist():
        a = int(starts[i])
        chosen = rule(torch.from_numpy(conf[a:a + lens[i]]), params[i], chunks[i])
        keep[a + chosen.numpy()] = True
    return keep


def _threshold_many(conf: np.ndarray, starts: np.ndarray, lens: np.ndarray, windows: np.ndarray,
                    params: Sequence[SamplingParams], keep: np.ndarray) -> None:
    """threshold_mask over every window marked in ``windows``, into ``keep``: confidences at or
    above the window's threshold (compared in fp32, as the tensor rule does) plus the window's
    first most confident position. Needs finite confidences."""
    window_of_row = np.repeat(np.arange(lens.size), lens)
    chosen_row = windows[window_of_row]
    thresholds = np.array([p.threshold for p in params], np.float32)
    keep |= chosen_row & (conf >= thresholds[window_of_row])
    best = np.maximum.reduceat(conf, starts)
    at_best = np.flatnonzero((conf == best[window_of_row]) & chosen_row)
    owner = window_of_row[at_best]
    first = np.ones(at_best.size, bool)
    first[1:] = owner[1:] != owner[:-1]
    keep[at_best[first]] = True


def commit_rule_for(config: "EngineConfig") -> CommitRule:
    """The engine's commit rule: the requests' own (the default), or, when the config names a
    ``replay_acceptance`` profile (benchmarks of random-weight models: a file, or a regime name
    of :mod:`optimus.decoding.regimes`), that profile replayed."""
    if config.replay_acceptance:
        from optimus.decoding import regimes
        from optimus.decoding.replay import ReplayAcceptance
        return ReplayAcceptance(regimes.load(config.replay_acceptance), seed=config.seed)
    return params_rule
