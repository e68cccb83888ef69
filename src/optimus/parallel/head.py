"""The part of a sharded model that spans ranks: the announcement of each call (rank 0 tells
the workers what to replay) and the vocabulary-parallel LM head.

The head never gathers logits for a greedy pick: each rank reduces its vocabulary slice to
(max, argmax, sum of exp(logit - max)) per row, and those three floats per row cross the wire.
The global argmax is the first rank's with the largest max (ties go to the lower id, as
``argmax`` does on the whole row); its probability is 1 / sum_r s_r exp(m_r - max).
Sampled rows (``sample``) are drawn on the shards too (``sampling.py``): a few values per row
cross, and only a top-p row its candidates cannot decide gathers its full row. Scoring
(echo/logprobs) needs the whole distribution: ``logits`` gathers it (only for its rows).
"""

from __future__ import annotations

import torch

from optimus.decoding.rules import RowDraws
from optimus.parallel.group import TPGroup
from optimus.parallel.sampling import VocabSlice, draw, gather_rows


class ModelParallel:
    def __init__(self, group: TPGroup, vocab_range: tuple[int, int], vocab: int) -> None:
        self.group = group
        self.lo, self.hi = vocab_range
        self.vocab = vocab
        self.rows_gathered_whole = 0  # sampled rows drawn from gathered full rows (top-p past the candidates)

    def announce(self, op: str, *args) -> None:
        """Rank 0: tell the workers to make the same call (a no-op on workers, who replay)."""
        if self.group.leader:
            from optimus.parallel.commands import message
            self.group.send(message(op, args))

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(x)

    def greedy(self, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """local logits [M, V/size] -> (argmax ids [M] int64, their probability [M] fp32)."""
        local = local.float()
        m, idx = local.max(dim=-1)
        s = (local - m[:, None]).exp().sum(-1)
        # ids travel as fp32: exact below 2**24, far above any vocabulary
        stats = torch.stack([m, (idx + self.lo).float(), s], dim=-1)
        every = torch.stack(self.group.all_gather(stats))  # [ranks, M, 3]
        best, winner = every[..., 0].max(dim=0)  # first rank holding the largest logit
        rows = torch.arange(every.shape[1], device=every.device)
        tokens = every[winner, rows, 1].long()
        total = (every[..., 2] * (every[..., 0] - best).exp()).sum(0)
        return tokens, total.reciprocal()

    def sample(self, local: torch.Tensor, draws: RowDraws, suppress_rows: torch.Tensor,
               suppress_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """local logits [M, V/size] -> ``rules.propose``'s (tokens [M], confidence [M]) on the full rows,
        with the (row, id) pairs ``suppress_rows``/``suppress_ids`` at -inf, without gathering them."""
        tokens, conf, whole = draw(local, draws, self._slice, self.group.all_gather, (suppress_rows, suppress_ids))
        self.rows_gathered_whole += whole
        return tokens, conf

    def logits(self, local: torch.Tensor) -> torch.Tensor:
        """local logits [M, V/size] -> the full rows [M, V] on every rank."""
        return gather_rows(local, self._slice, self.group.all_gather)

    @property
    def _slice(self) -> VocabSlice:
        return VocabSlice(self.lo, self.hi, self.vocab, self.group.size)
