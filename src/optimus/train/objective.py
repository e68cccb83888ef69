"""The block-diffusion training objective (SDAR / BD3-LM).

A row ``x`` of ``L`` tokens is split into blocks of ``block``. Each block ``b`` draws its own
mask ratio ``t_b ~ U(eps, 1)`` and each noisable token of it is replaced by the mask id with
probability ``t_b``. The model runs once over ``[x_noisy, x_clean]`` (``2L`` tokens, both halves
at positions ``0..L-1``) under a mask that lets

* a noisy token of block ``b`` see the noisy tokens of block ``b`` and clean blocks ``< b``;
* a clean token of block ``b`` see clean blocks ``<= b`` (block-causal, as served).

The loss is the cross entropy on the masked noisy positions weighted by ``1 / t_b``, summed
and divided by the number of noisable tokens (an unbiased estimate of the NELBO per token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from optimus.train.pack import CLEAN_FLAG


@dataclass(frozen=True)
class NoisedBatch:
    clean: torch.Tensor  # [B, L] token ids
    noisy: torch.Tensor  # [B, L] ids with masked positions set to mask_id
    masked: torch.Tensor  # [B, L] bool: positions that carry loss
    weight: torch.Tensor  # [B, L] float: 1 / t of the position's block
    noisable: torch.Tensor  # [B, L] bool: positions that could have been masked


def split_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed uint16-as-int rows [B, L] -> (token ids, noisable bool)."""
    rows = rows.long()
    return rows & (CLEAN_FLAG - 1), (rows & CLEAN_FLAG) == 0


def noise(rows: torch.Tensor, mask_id: int, block: int, eps: float,
          generator: torch.Generator | None = None) -> NoisedBatch:
    ids, noisable = split_rows(rows)
    b, l = ids.shape
    t = torch.rand(b, l // block, 1, device=ids.device, generator=generator) * (1 - eps) + eps
    t = t.expand(-1, -1, block).reshape(b, l)
    masked = (torch.rand(b, l, device=ids.device, generator=generator) < t) & noisable
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    return NoisedBatch(ids, noisy, masked, 1.0 / t, noisable)


def visible(q_idx: torch.Tensor, k_idx: torch.Tensor, length: int, block: int) -> torch.Tensor:
    """May concatenated position q_idx attend to k_idx (both in [0, 2L))? Broadcasts."""
    q_noisy, k_noisy = q_idx < length, k_idx < length
    qb = (q_idx % length) // block
    kb = (k_idx % length) // block
    noisy_q = q_noisy & ((k_noisy & (kb == qb)) | (~k_noisy & (kb < qb)))
    clean_q = ~q_noisy & ~k_noisy & (kb <= qb)
    return noisy_q | clean_q


def dense_mask(length: int, block: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [2L, 2L] attention mask (True = attend) for SDPA."""
    idx = torch.arange(2 * length, device=device)
    return visible(idx[:, None], idx[None, :], length, block)


def weighted_loss(logits: torch.Tensor, batch: NoisedBatch) -> torch.Tensor:
    """logits [B, L, V] of the noisy half -> scalar loss."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), batch.clean.flatten(), reduction="none")
    ce = ce.view_as(batch.weight)
    total = (ce * batch.weight * batch.masked).sum()
    return total / batch.noisable.sum().clamp(min=1)


def masked_ce(logits: torch.Tensor, batch: NoisedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of unweighted CE on masked positions, their count): for held-out loss reports."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), batch.clean.flatten(), reduction="none")
    ce = ce.view_as(batch.weight)
    return (ce * batch.masked).sum(), batch.masked.sum()
