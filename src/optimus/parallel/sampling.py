"""Vocabulary-parallel sampling: ``rules.propose`` over logit rows whose vocabulary is split
across ranks, without gathering the rows.

Every rank holds columns [lo, hi) of each row and makes the same calls on the same gathered
values, so every rank reaches the same tokens (rank 0 keeps them, workers drop them):

* the draw is Gumbel-max: each rank adds the noise of its own ids (``rules.gumbel_slice``, the
  full rows' values there) to its filtered scaled logits and sends (max, its id); the winner is
  the first rank with the largest value, i.e. the lowest id on a tie, as ``argmax`` on the row;
* confidence is the token's softmax probability: (max, sum exp) per rank give the row's
  log-sum-exp, as in ``ModelParallel.greedy``;
* top-k / top-p (``rules._filter``) are decided on candidates: each rank's best ``C`` ids
  (value descending, then id ascending), merged into the row's best ``C``. Top-k (k <= C) is
  exact, and so is top-p over what it kept. Top-p alone takes ``NUCLEUS_CANDIDATES``; a row
  whose candidates do not hold more than top_p (plus a margin) of its probability, or whose
  top-k exceeds ``MAX_CANDIDATES``, gathers its full row and draws it with ``propose``
  (counted: the call returns how many rows did). Every rank decides this from the same gathered
  values, so every rank makes that gather too.

Decisions that hinge on fp32 rounding (a cumulative probability within rounding of top_p) are
made on sums taken in another order than ``_filter``'s and may come out the other way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from optimus.decoding.rules import GREEDY_TEMPERATURE, RowDraws, gumbel_slice, propose

Gather = Callable[[torch.Tensor], list[torch.Tensor]]  # every rank's tensor (same shape), in rank order

NUCLEUS_CANDIDATES = 256  # per rank, for a top-p row without top-k
MAX_CANDIDATES = 1024  # per rank; a larger top-k gathers its full rows
COVER_MARGIN = 1e-4  # top-p is decided on the candidates only when they hold > top_p + this
NEG_INF = float("-inf")


@dataclass(frozen=True)
class VocabSlice:
    """This rank's columns [lo, hi) of a vocabulary of ``vocab`` ids split over ``ranks``."""

    lo: int
    hi: int
    vocab: int
    ranks: int

    @property
    def per(self) -> int:
        """Columns every rank's gathered tensors are padded to (the last rank's slice is shorter)."""
        return -(-self.vocab // self.ranks)


def draw(local: torch.Tensor, draws: RowDraws, span: VocabSlice, gather: Gather,
         suppress: tuple[torch.Tensor, torch.Tensor] | None = None, nucleus: int = NUCLEUS_CANDIDATES,
         max_k: int = MAX_CANDIDATES) -> tuple[torch.Tensor, torch.Tensor, int]:
    """local logits [M, hi - lo] -> (tokens [M] int64, confidence [M] fp32, rows gathered whole).

    ``suppress``: (rows, ids) pairs, two int64 [P], whose logits are -inf (min_tokens); each rank
    writes the ids of its slice."""
    assert span.vocab < 1 << 24, "ids travel as fp32"
    local = _suppressed(local.float(), span, suppress)
    greedy = draws.temperature <= GREEDY_TEMPERATURE
    scaled = local / torch.where(greedy, 1.0, draws.temperature)[:, None]
    k = torch.where((draws.top_k > 0) & (draws.top_k < span.vocab), draws.top_k, 0)  # 0: no top-k
    filtering = ~greedy & ((k > 0) | (draws.top_p < 1.0))
    whole = torch.zeros_like(filtering)
    score = scaled
    if not bool(greedy.all()):
        kept = scaled
        if bool(filtering.any()):
            keep, whole = _filter_mask(scaled, draws, k, filtering, span, gather, nucleus, max_k)
            kept = scaled.masked_fill(~keep, NEG_INF)
        noisy = kept + gumbel_slice(draws, span.lo, span.hi)
        score = torch.where(greedy[:, None], scaled, noisy)
    tokens, conf = _winners(scaled, score, span, gather)
    if bool(whole.any()):  # the same rows on every rank: every rank gathers them
        rows = torch.nonzero(whole).flatten()
        t, c = propose(gather_rows(local[rows], span, gather), _take(draws, rows))
        tokens[rows], conf[rows] = t, c
    return tokens, conf, int(whole.sum())


def gather_rows(local: torch.Tensor, span: VocabSlice, gather: Gather) -> torch.Tensor:
    """local logits [M, hi - lo] -> the full rows [M, vocab] on every rank."""
    if local.shape[1] < span.per:  # the last rank's short slice
        local = torch.nn.functional.pad(local, (0, span.per - local.shape[1]), value=NEG_INF)
    return torch.cat(gather(local), dim=-1)[:, :span.vocab]


def _suppressed(local: torch.Tensor, span: VocabSlice,
                suppress: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """``local`` with the suppressed ids of this slice at -inf (a copy: the caller's stays)."""
    if suppress is not None and suppress[0].numel():
        rows, ids = suppress
        mine = (ids >= span.lo) & (ids < span.hi)
        local = local.clone()
        local[rows[mine], ids[mine] - span.lo] = NEG_INF
    return local


def _take(draws: RowDraws, rows: torch.Tensor) -> RowDraws:
    return RowDraws(**{f.name: getattr(draws, f.name)[rows] for f in fields(RowDraws)})


def _local_lse(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, n] -> (max [M], sum exp(x - max) [M]); a row of -inf (all suppressed here) is (-inf, 0)."""
    if x.shape[1] == 0:
        return x.new_full((x.shape[0],), NEG_INF), x.new_zeros(x.shape[0])
    m = x.max(dim=-1).values
    safe = torch.where(torch.isfinite(m), m, 0.0)
    return m, (x - safe[:, None]).exp().sum(-1)


def _combine(m: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-rank (max, sum exp) [R, M] -> the row's (max, sum exp(x - max)) [M]."""
    top = m.max(dim=0).values
    return top, (s * (m - top).exp()).sum(0)


def _winners(scaled: torch.Tensor, score: torch.Tensor, span: VocabSlice,
             gather: Gather) -> tuple[torch.Tensor, torch.Tensor]:
    """argmax over the whole rows of ``score`` [M, n] (lowest id on a tie) and the softmax
    probability of ``scaled`` there. One gather of 5 fp32 per row."""
    rows = torch.arange(score.shape[0], device=score.device)
    if score.shape[1]:
        best = score.argmax(dim=-1)  # the first (lowest) id among this slice's equal maxima
        value, at = score[rows, best], scaled[rows, best]
    else:  # an empty slice never wins
        best, value, at = rows * 0, score.new_full(rows.shape, NEG_INF), score.new_full(rows.shape, NEG_INF)
    m, s = _local_lse(scaled)
    every = torch.stack(gather(torch.stack([value, (best + span.lo).float(), at, m, s], dim=-1)))  # [R, M, 5]
    winner = every[..., 0].argmax(dim=0)  # the first rank holding the largest value: the lowest id
    top, total = _combine(every[..., 3], every[..., 4])
    at = every[winner, rows, 2]
    return every[winner, rows, 1].long(), (at - top).exp() / total


def _filter_mask(scaled: torch.Tensor, draws: RowDraws, k: torch.Tensor, filtering: torch.Tensor,
                 span: VocabSlice, gather: Gather, nucleus: int,
                 max_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which ids of this slice ``rules._filter`` keeps -> (keep [M, n] bool, whole [M] bool: rows the
    candidates cannot decide, drawn from their full rows). Rows not ``filtering`` keep every id."""
    need = int(torch.where(k > 0, k, nucleus)[filtering].max())
    c = min(need, max_k, span.per)  # candidates per rank
    values, ids, top, total = _merged_candidates(scaled, c, span, gather)
    complete = c == span.per  # every rank sent its whole slice: the merged list is the row
    width = span.vocab if complete else c  # the merged list's leading entries that are the row's best
    values, ids = values[:, :width], ids[:, :width]
    pos = torch.arange(width, device=scaled.device)[None, :]
    bound = torch.where(k > 0, k, span.vocab)[:, None]
    ordered = values.masked_fill(pos >= bound, NEG_INF)
    # The set top-p normalises over (what top-k kept) is known when it lies in the candidates;
    # else (top-p alone) it is the whole row, whose log-sum-exp came with the candidates.
    known = torch.full_like(filtering, complete) | ((k > 0) & (k <= width))
    p = torch.where(known[:, None], torch.softmax(ordered, dim=-1), (ordered - top[:, None]).exp() / total[:, None])
    cum = p.cumsum(-1)
    nucleus = (cum - p > draws.top_p[:, None]) & (draws.top_p < 1.0)[:, None]  # rules._filter's test
    kept = (pos < bound) & ~nucleus
    covered = known | ((k == 0) & (cum[:, -1] > draws.top_p + COVER_MARGIN))
    n = span.hi - span.lo
    cols = ids.long() - span.lo
    cols = torch.where(kept & (cols >= 0) & (cols < n), cols, n)  # column n: a sink for the others
    keep = torch.zeros(scaled.shape[0], n + 1, dtype=torch.bool, device=scaled.device).scatter_(1, cols, True)
    keep = keep[:, :n] | ~filtering[:, None]
    return keep, filtering & ~covered


def _merged_candidates(scaled: torch.Tensor, c: int, span: VocabSlice,
                       gather: Gather) -> tuple[torch.Tensor, ...]:
    """Each rank's best ``c`` (value, id) of ``scaled`` [M, n], merged -> (values [M, R*c],
    ids [M, R*c] fp64, ordered by value descending then id ascending; the row's max [M] and
    sum exp [M]). The first ``c`` merged entries are the row's best ``c``. One gather of 2 + 2c
    fp64 per row (fp64 carries fp32 values and ids exactly)."""
    m, s = _local_lse(scaled)
    values, idx = torch.sort(scaled, dim=-1, descending=True, stable=True)  # equal values: lower id first
    values, ids = values[:, :c].double(), (idx[:, :c] + span.lo).double()
    if values.shape[1] < c:  # the last rank's short slice: -inf entries after every real id
        pad = c - values.shape[1]
        values = torch.nn.functional.pad(values, (0, pad), value=NEG_INF)
        ids = torch.nn.functional.pad(ids, (0, pad), value=float(span.vocab))
    packed = torch.cat([m.double()[:, None], s.double()[:, None], values, ids], dim=-1)
    every = torch.stack(gather(packed))  # [R, M, 2 + 2c]
    rows = every.shape[1]
    top, total = _combine(every[..., 0], every[..., 1])
    values = every[..., 2:2 + c].permute(1, 0, 2).reshape(rows, -1)  # rank by rank: ids ascending across ranks
    ids = every[..., 2 + c:].permute(1, 0, 2).reshape(rows, -1)
    # stable: equal values keep rank order, and within a rank id order, so the lower id first
    values, order = torch.sort(values, dim=-1, descending=True, stable=True)
    return values.float(), ids.gather(-1, order), top.float(), total.float()
