"""The logit rows of a sampled draw on a tensor-parallel model, before any logit exists.

The postprocessor reads sampled rows as gathered logits: it takes row ranges and row subsets,
writes -inf at a request's suppressed ids (min_tokens), and hands the rows to the draw. On a
shard those rows are never gathered: ``SampledRows`` stands in for them, keeping the hidden
states and recording the suppressed (row, id) pairs; ``propose`` on them runs the LM head and
the vocabulary-parallel draw (``DecoderLM.sample``), each rank suppressing the ids of its slice.
"""

from __future__ import annotations

import math

import torch

from optimus.decoding import rules
from optimus.decoding.rules import RowDraws


def propose(logits: "torch.Tensor | SampledRows", draws: RowDraws) -> tuple[torch.Tensor, torch.Tensor]:
    """``rules.propose``, on gathered logits or on ``SampledRows``."""
    if isinstance(logits, SampledRows):
        return logits.draw(draws)
    return rules.propose(logits, draws)


class SampledRows:
    """Rows ``rows`` of ``hidden``; ``suppressed`` is shared by every view of the same call."""

    def __init__(self, model, hidden: torch.Tensor, rows: torch.Tensor | None = None,
                 suppressed: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self.model = model  # a tensor-parallel DecoderLM (``parallel`` set)
        self.hidden = hidden  # [N, d]: every row of the call
        self.rows = torch.arange(hidden.shape[0], device=hidden.device) if rows is None else rows  # [n] into hidden
        # (hidden rows [e], ids [s]): every id of ``ids`` is -inf on every row of ``rows``
        self.suppressed = [] if suppressed is None else suppressed

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, key: slice | torch.Tensor) -> "SampledRows":
        """A row range or a 1-D tensor of row indices, as on a [n, V] tensor."""
        if not isinstance(key, (slice, torch.Tensor)):
            raise TypeError(f"sampled rows are selected by a slice or an index tensor, not {type(key).__name__}")
        return SampledRows(self.model, self.hidden, self.rows[key], self.suppressed)

    def __setitem__(self, key: tuple[torch.Tensor, torch.Tensor], value: float) -> None:
        """``rows[r[:, None], ids] = -inf`` (the postprocessor's min_tokens write), recorded."""
        rows, ids = key
        if not (isinstance(value, float) and math.isinf(value) and value < 0) or rows.dim() != 2:
            raise TypeError("sampled rows take only -inf at (row indices [e, 1], ids [s])")
        self.suppressed.append((self.rows[rows.flatten().to(self.rows.device)], ids.flatten().to(self.rows.device)))

    def suppression(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This view's suppressed pairs: (rows of the view [P], ids [P]) int64."""
        position = torch.full((self.hidden.shape[0],), -1, dtype=torch.int64, device=self.device)
        position[self.rows] = torch.arange(len(self), device=self.device)
        pairs_r, pairs_i = [], []
        for rows, ids in self.suppressed:
            r = position[rows]
            r = r[r >= 0]
            pairs_r.append(r.repeat_interleave(ids.numel()))
            pairs_i.append(ids.repeat(r.numel()))
        empty = torch.zeros(0, dtype=torch.int64, device=self.device)
        return (torch.cat(pairs_r) if pairs_r else empty), (torch.cat(pairs_i) if pairs_i else empty)

    @torch.inference_mode()
    def draw(self, draws: RowDraws) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (tokens [n], confidence [n]) as ``rules.propose`` on these rows' gathered logits."""
        rows, ids = self.suppression()
        return self.model.sample(self.hidden[self.rows], draws, rows, ids)
