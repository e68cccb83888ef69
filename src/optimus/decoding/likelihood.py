"""Likelihood of ``tokens[c:]`` given ``tokens[:c]`` under the served model, as rows of plain
dense forwards (no paged cache).

* **Causal LMs: exact.** One row; token ``i`` reads the log-softmax of row ``i - 1``.
* **Block-causal diffusion (SDAR): the block-diffusion ELBO.** A row is the clean sequence
  followed by a noised copy of the blocks that hold scored tokens (both at their own
  positions). A noised block sees the clean blocks before it and itself, as in SDAR's training
  objective. In each noised block, ``m`` of its ``n`` scored tokens are masked, ``m`` uniform
  in ``1..n`` (ratio ``t = m / n``), and each masked token's log-probability is weighted by
  ``1 / t``. Context tokens are never masked.
* **Full attention (LLaDA, Dream): LLaDA's Monte Carlo estimate** (its
  ``get_log_likelihood``): ``l`` of the ``L`` scored tokens masked, ``l`` uniform in ``1..L``,
  masked log-probs weighted by ``L / l``. Dream reads token ``i`` from row ``i - 1``.

Masking ``m`` uniform in ``1..n`` tokens with weight ``n / m`` is the discrete form of
``E_t[1/t * sum over masked log p]`` with ``t ~ U(0, 1]`` (the same bound; LLaDA uses it for
its lower variance). Over the samples of one sequence the counts are stratified (evenly spaced
from a random start, each still uniform), as LLaDA does. The estimate is the mean over
samples; every term is a log-probability times a positive weight, so it is ``<= 0``.

**Per-token values.** Token ``i`` gets its share of the estimate: the mean over samples of
``weight * log p(token i)`` when it was masked, 0 otherwise; the shares sum to the estimate.
Alternatives (top-N) are ranked by the same share computed for every vocabulary entry at that
position, so the scored token and its alternatives are on one scale. Causal models: the
model's exact log-probabilities.

**Chained sequences** (``ScoreRequest.chained``): each token is scored as a one-token
continuation of the tokens before it, the case where both estimators are exact (one masked
token, weight 1). Sums over any span are then ``sum log p(x_i | x_<i)`` whatever the span's
start: what a caller needs who scores a span without saying where its context ends (lm-eval
sums echoed prompt logprobs over the continuation). Costs about ``L^2 / 2`` row tokens (full
attention) or ``L * block / 2`` plus the clean prefixes (block-causal), with no sampling.

Randomness comes from a CPU generator seeded per sequence, so a sequence scores the same
whatever else is in its request and on whatever device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from optimus.core.scoring import TokenScores
from optimus.models.dense import DenseBackend
from optimus.models.spec import AttentionKind, ModelSpec

EXACT, BLOCK_ELBO, MONTE_CARLO = "exact", "block_elbo", "mc"
_HEAD_ROWS = 1024  # LM-head rows per slice: bounds the [rows, vocab] fp32 log-softmax


@dataclass(frozen=True)
class Row:
    """One forward row of sequence ``seq``: ``ids``/``positions`` [R] (CPU, long). ``groups``
    [R] (block-causal rows): 0 for the clean tokens, k > 0 for the k-th noised copy, which sees
    the clean blocks before its own and, in its own block, only its own copy. Logits of row
    ``reads`` [K] score
    ``targets`` [K] (the true tokens) with ``weights`` [K], credited to scored token ``slots``
    [K] (index ``position - context_len``)."""

    seq: int
    ids: torch.Tensor
    positions: torch.Tensor
    groups: torch.Tensor | None
    reads: torch.Tensor
    targets: torch.Tensor
    slots: torch.Tensor
    weights: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])


def method_for(spec: ModelSpec) -> str:
    if spec.attention is AttentionKind.CAUSAL:
        return EXACT
    if spec.attention is AttentionKind.BLOCK_CAUSAL:
        if spec.logit_shift:
            raise ValueError("block-diffusion scoring of a shifted-logit model is not supported")
        return BLOCK_ELBO
    return MONTE_CARLO


def row_tokens(spec: ModelSpec, length: int, context_len: int, block: int, chained: bool = False) -> int:
    """Tokens the longest forward row of this sequence takes (what the token budget must hold)."""
    if chained or method_for(spec) != BLOCK_ELBO:
        return length
    return (length - 1) // block * block + length - context_len // block * block


def rows_for(spec: ModelSpec, seq: int, tokens: list[int], context_len: int, samples: int,
             seed: int, block: int, chained: bool = False, budget: int | None = None) -> list[Row]:
    """The rows that score one sequence (``samples`` of them for the estimators; ``chained``:
    every token as its own one-token continuation, see ``_chain_rows``)."""
    ids = torch.tensor(tokens, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    method = method_for(spec)
    if method == EXACT:
        return [_causal_row(seq, ids, context_len)]
    if chained:
        return _chain_rows(spec, seq, ids, context_len, block, budget or len(tokens))
    if method == BLOCK_ELBO:
        return _block_rows(seq, ids, context_len, samples, gen, int(spec.mask_id), block)
    return _mc_rows(seq, ids, context_len, samples, gen, int(spec.mask_id), 1 if spec.logit_shift else 0)


def stratified_counts(n: int, samples: int, gen: torch.Generator) -> list[int]:
    """``samples`` counts in ``1..n``: each uniform, together evenly spread (LLaDA's scheme)."""
    k = int(torch.randint(1, n + 1, (), generator=gen))
    return [(round(k + s * n / samples) - 1) % n + 1 for s in range(samples)]


def _causal_row(seq: int, ids: torch.Tensor, ctx: int) -> Row:
    n = ids.shape[0] - ctx
    return Row(seq, ids, torch.arange(ids.shape[0]), None, torch.arange(ctx - 1, ids.shape[0] - 1),
               ids[ctx:], torch.arange(n), torch.ones(n, dtype=torch.float64))


def _mc_rows(seq: int, ids: torch.Tensor, ctx: int, samples: int, gen: torch.Generator, mask_id: int,
             shift: int) -> list[Row]:
    n = ids.shape[0] - ctx
    rows = []
    for count in stratified_counts(n, samples, gen):
        slots = torch.randperm(n, generator=gen)[:count].sort().values
        noised = ids.clone()
        noised[slots + ctx] = mask_id
        rows.append(Row(seq, noised, torch.arange(ids.shape[0]), None, slots + ctx - shift, ids[slots + ctx],
                        slots, torch.full((count,), n / count, dtype=torch.float64)))
    return rows


def _block_rows(seq: int, ids: torch.Tensor, ctx: int, samples: int, gen: torch.Generator, mask_id: int,
                block: int) -> list[Row]:
    length = ids.shape[0]
    first, last = ctx // block, (length - 1) // block
    clean_len, noisy_start = last * block, first * block  # clean blocks < last; noised blocks first..last
    spans = [(max(ctx, b * block), min(length, (b + 1) * block)) for b in range(first, last + 1)]
    counts = [stratified_counts(hi - lo, samples, gen) for lo, hi in spans]
    positions = torch.cat([torch.arange(clean_len), torch.arange(noisy_start, length)])
    groups = torch.cat([torch.zeros(clean_len, dtype=torch.long), torch.ones(length - noisy_start, dtype=torch.long)])
    rows = []
    for s in range(samples):
        noised = ids[noisy_start:].clone()
        masked, weights = [], []
        for (lo, hi), per_block in zip(spans, counts):
            n, m = hi - lo, per_block[s]
            picked = torch.randperm(n, generator=gen)[:m].sort().values + lo
            masked.append(picked)
            weights.append(torch.full((m,), n / m, dtype=torch.float64))
        where = torch.cat(masked)
        noised[where - noisy_start] = mask_id
        rows.append(Row(seq, torch.cat([ids[:clean_len], noised]), positions, groups,
                        where - noisy_start + clean_len, ids[where], where - ctx, torch.cat(weights)))
    return rows


def _chain_rows(spec: ModelSpec, seq: int, ids: torch.Tensor, ctx: int, block: int, budget: int) -> list[Row]:
    """Token ``i`` scored as a one-token continuation of ``ids[:i]``: the estimators' own case of
    one scored token, where they are exact (one masked token, weight 1): its log-probability at
    a masked position right after its prefix, nothing after it. Deterministic; sums over any
    span are chain-rule sums ``sum log p(x_i | x_<i)``, whatever the span's start.

    Full attention: one row ``ids[:i] + [mask]`` per token. Block-causal: one row per block (more
    when the budget says so) holding the clean blocks before it once, then one group
    ``ids[block start:i] + [mask]`` per token ``i`` of the block."""
    mask_id, length = int(spec.mask_id), ids.shape[0]
    mask = torch.tensor([mask_id])
    one = torch.ones(1, dtype=torch.float64)
    if spec.attention is AttentionKind.FULL:
        shift = 1 if spec.logit_shift else 0
        return [Row(seq, torch.cat([ids[:i], mask]), torch.arange(i + 1), None, torch.tensor([i - shift]),
                    ids[i:i + 1], torch.tensor([i - ctx]), one) for i in range(ctx, length)]
    rows = []
    for start in range(ctx // block * block, length, block):
        pending: list[int] = []
        for i in range(max(ctx, start), min(length, start + block)):
            if pending and start + sum(j - start + 1 for j in pending) + i - start + 1 > budget:
                rows.append(_chain_block_row(seq, ids, ctx, start, pending, mask))
                pending = []
            pending.append(i)
        rows.append(_chain_block_row(seq, ids, ctx, start, pending, mask))
    return rows


def _chain_block_row(seq: int, ids: torch.Tensor, ctx: int, start: int, targets: list[int],
                     mask: torch.Tensor) -> Row:
    """The clean prefix ``ids[:start]``, then group k: ``ids[start:i_k] + [mask]``."""
    pieces, positions, groups, reads = [ids[:start]], [torch.arange(start)], [torch.zeros(start, dtype=torch.long)], []
    offset = start
    for k, i in enumerate(targets, 1):
        pieces.append(torch.cat([ids[start:i], mask]))
        positions.append(torch.arange(start, i + 1))
        groups.append(torch.full((i - start + 1,), k, dtype=torch.long))
        offset += i - start + 1
        reads.append(offset - 1)
    where = torch.tensor(targets)
    return Row(seq, torch.cat(pieces), torch.cat(positions), torch.cat(groups), torch.tensor(reads), ids[where],
               where - ctx, torch.ones(len(targets), dtype=torch.float64))


def batch_mask(spec: ModelSpec, rows: list[Row], block: int, device: torch.device) -> torch.Tensor | None:
    """[B, R, R] boolean attention (True = attend) for rows padded to the longest; None when no
    row needs one (full attention, equal lengths). Padding keys are hidden; a padding query
    sees only itself (a row with nothing to attend to would give NaNs)."""
    width = max(r.length for r in rows)
    if spec.attention is AttentionKind.FULL and all(r.length == width for r in rows):
        return None
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    group = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        pos[i, :r.length], valid[i, :r.length] = r.positions, True
        if r.groups is not None:
            group[i, :r.length] = r.groups
    pos, group, valid = pos.to(device), group.to(device), valid.to(device)
    q, k = pos[:, :, None], pos[:, None, :]
    if spec.attention is AttentionKind.CAUSAL:
        mask = k <= q
    elif spec.attention is AttentionKind.FULL:
        mask = torch.ones(len(rows), width, width, dtype=torch.bool, device=device)
    else:  # clean tokens block-causal; a noised copy sees earlier clean blocks and, in its block, itself
        qb, kb = torch.div(q, block, rounding_mode="floor"), torch.div(k, block, rounding_mode="floor")
        gq, gk = group[:, :, None], group[:, None, :]
        clean_q, clean_k = gq == 0, gk == 0
        mask = (clean_q & clean_k & (kb <= qb)) | (~clean_q & (((gk == gq) & (kb == qb)) | (clean_k & (kb < qb))))
    eye = torch.eye(width, dtype=torch.bool, device=device)[None]
    return (mask & valid[:, None, :]) | (eye & ~valid[:, :, None])


class Accumulator:
    """Sums of one sequence's weighted log-probs over its rows; ``result`` divides by the
    sample count. With ``top_n`` it also keeps the weighted log-softmax of every vocabulary
    entry per scored token ([n, V] fp32), from which the token's own value is then read too."""

    def __init__(self, tokens: list[int], context_len: int, vocab: int, top_n: int, samples: int,
                 device: torch.device) -> None:
        n = len(tokens) - context_len
        self.targets = torch.tensor(tokens[context_len:], dtype=torch.long, device=device)
        self.top_n, self.samples = top_n, samples
        self.values = torch.zeros(n, dtype=torch.float64, device=device)
        self.hits = torch.zeros(n, dtype=torch.long, device=device)
        self.full = torch.zeros(n, vocab, dtype=torch.float32, device=device) if top_n else None

    def add(self, slots: torch.Tensor, weights: torch.Tensor, logp: torch.Tensor) -> None:
        """slots [K], weights [K] (float64), logp [K, V] fp32 log-softmax of those rows."""
        picked = logp.gather(1, self.targets[slots][:, None]).squeeze(1)
        self.values.index_add_(0, slots, picked.double() * weights)
        self.hits.index_add_(0, slots, torch.ones_like(slots))
        if self.full is not None:
            self.full.index_add_(0, slots, logp * weights.float()[:, None])

    def result(self) -> TokenScores:
        values = self.values / self.samples
        if self.full is None:
            return TokenScores(tuple(values.tolist()), ((),) * len(values), ((),) * len(values))
        full = self.full / self.samples
        values = full.gather(1, self.targets[:, None]).squeeze(1).double()  # one scale with the ranking
        top_vals, top_ids = full.topk(min(self.top_n, full.shape[1]), dim=1)
        seen = (self.hits > 0).tolist()  # never masked: no alternatives were scored
        ids = tuple(tuple(i) if s else () for i, s in zip(top_ids.tolist(), seen))
        vals = tuple(tuple(v) if s else () for v, s in zip(top_vals.tolist(), seen))
        return TokenScores(tuple(values.tolist()), ids, vals)


def run_rows(model, spec: ModelSpec, rows: list[Row], accumulators: dict[int, Accumulator], block: int,
             device: torch.device) -> None:
    """One dense forward over ``rows`` (padded to the longest), credited to the accumulators."""
    width = max(r.length for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :r.length], pos[i, :r.length] = r.ids, r.positions
    mask = batch_mask(spec, rows, block, device)
    backend = DenseBackend(len(rows), width, mask)
    hidden = model(ids.to(device).reshape(-1), pos.to(device).reshape(-1), backend)  # [B*R, d]
    reads = torch.cat([r.reads + i * width for i, r in enumerate(rows)]).to(device)
    slots = torch.cat([r.slots for r in rows]).to(device)
    weights = torch.cat([r.weights for r in rows]).to(device)
    owner = torch.cat([torch.full((len(r.reads),), r.seq) for r in rows]).to(device)
    for lo in range(0, len(reads), _HEAD_ROWS):
        part = slice(lo, lo + _HEAD_ROWS)
        logp = model.logits(hidden[reads[part]]).float().log_softmax(-1)
        for seq in owner[part].unique().tolist():
            take = owner[part] == seq
            accumulators[seq].add(slots[part][take], weights[part][take], logp[take])
