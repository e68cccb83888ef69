"""The block-diffusion training objective (SDAR / BD3-LM).

A row ``x`` of ``L`` tokens is split into blocks of ``block``. Each block ``b`` draws its own
mask ratio ``t_b ~ U(eps, 1)`` and each noisable token of it is replaced by the mask id with
probability ``t_b``. The model runs once over ``[x_noisy, x_clean]`` (``2L`` tokens, both halves
at positions ``0..L-1``) under a mask that lets

* a noisy token of block ``b`` see the noisy tokens of block ``b`` and clean blocks ``< b``;
* a clean token of block ``b`` see clean blocks ``<= b`` (block-causal, as served).

The loss is the cross entropy on the masked noisy positions weighted by ``1 / t_b``, summed
and divided by the number of noisable tokens (an unbiased estimate of the NELBO per token).

Chunk-robust variant (``chunk_mix > 0``): the unit of noising and attention is a *segment*,
not the block. A block either stays one segment (plain SDAR) or is cut the way chunked
decoding walks it (``chunk_segments``) with ``C`` in {1, 2, 4, 8, 16, 32}. Segment ids are ``block * SEG_STRIDE + local``: non-decreasing along a row, new at every block start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from optimus_lab.train.pack import CLEAN_FLAG


@dataclass(frozen=True)
class NoisedBatch:
    clean: torch.Tensor  # [B, L] token ids
    noisy: torch.Tensor  # [B, L] ids with masked positions set to mask_id
    masked: torch.Tensor  # [B, L] bool: positions that carry loss
    weight: torch.Tensor  # [B, L] float: 1 / t of the position's block
    noisable: torch.Tensor  # [B, L] bool: positions that could have been masked


SEG_STRIDE = 64  # > the most segments one block can hold (block + 1)
CHUNK_SIZES = (1, 2, 4, 8, 16, 32)


def block_segments(batch: int, length: int, block: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """One segment per block: [B, L] ids (the plain SDAR objective)."""
    return (torch.arange(length, device=device) // block * SEG_STRIDE).expand(batch, length).contiguous()


def chunk_segments(batch: int, length: int, block: int, chunk_mix: float,
                   generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, L] segment ids: a ``chunk_mix`` share of (row, block) pairs cut the way the engine
    walks a block at chunk size C (see module doc); the rest whole blocks.

    The engine's first group in a block is the uncached head ``[block start, o)`` (the prompt
    tail; ``o = 0`` in later blocks) together with the first chunk, then chunks of C follow:
    segments ``[0, o + C)``, ``[o + C, o + 2C)``, ... cut at the block end.
    """
    nb = length // block
    shape = (batch, nb, 1)
    sizes = torch.tensor(CHUNK_SIZES, device=device)
    c = sizes[torch.randint(len(CHUNK_SIZES), shape, device=device, generator=generator)]
    head = torch.randint(block, shape, device=device, generator=generator)
    head = torch.where(torch.rand(shape, device=device, generator=generator) < 0.5, torch.zeros_like(head), head)
    j = torch.arange(block, device=device).view(1, 1, block)
    first_end = head + c
    local = torch.where(j < first_end, torch.zeros_like(j), 1 + torch.div(j - first_end, c, rounding_mode="floor"))
    cut = torch.rand(shape, device=device, generator=generator) < chunk_mix
    local = torch.where(cut, local, torch.zeros_like(local))
    blocks = torch.arange(nb, device=device).view(1, nb, 1) * SEG_STRIDE
    return (blocks + local).reshape(batch, length)


def split_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows [B, L] (ids with CLEAN_FLAG on prompt tokens) -> (token ids, noisable bool)."""
    rows = rows.long()
    return rows & (CLEAN_FLAG - 1), (rows & CLEAN_FLAG) == 0


def noise(rows: torch.Tensor, mask_id: int, block: int, eps: float,
          generator: torch.Generator | None = None, segments: torch.Tensor | None = None) -> NoisedBatch:
    """Mask each segment (default: each block) at its own ratio t ~ U(eps, 1)."""
    ids, noisable = split_rows(rows)
    b, l = ids.shape
    seg = block_segments(b, l, block, ids.device) if segments is None else segments
    per_seg = torch.rand(b, (l // block) * SEG_STRIDE, device=ids.device, generator=generator) * (1 - eps) + eps
    t = per_seg.gather(1, seg)
    masked = (torch.rand(b, l, device=ids.device, generator=generator) < t) & noisable
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    return NoisedBatch(ids, noisy, masked, 1.0 / t, noisable)


def visible(q_idx: torch.Tensor, k_idx: torch.Tensor, length: int, block: int) -> torch.Tensor:
    """May concatenated position q_idx attend to k_idx (both in [0, 2L))? Broadcasts."""
    return visible_segments(q_idx, k_idx, length, (q_idx % length) // block, (k_idx % length) // block)


def visible_segments(q_idx: torch.Tensor, k_idx: torch.Tensor, length: int,
                     qb: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
    """As ``visible`` with the segment ids of the query and key rows given (qb, kb)."""
    q_noisy, k_noisy = q_idx < length, k_idx < length
    noisy_q = q_noisy & ((k_noisy & (kb == qb)) | (~k_noisy & (kb < qb)))
    clean_q = ~q_noisy & ~k_noisy & (kb <= qb)
    return noisy_q | clean_q


def dense_mask(length: int, block: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [2L, 2L] attention mask (True = attend) for SDPA."""
    idx = torch.arange(2 * length, device=device)
    return visible(idx[:, None], idx[None, :], length, block)


def dense_segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, 2L, 2L] mask for per-row segment ids [B, L]."""
    b, l = segments.shape
    idx = torch.arange(2 * l, device=segments.device)
    seg2 = segments.repeat(1, 2)  # [B, 2L]: both halves share the row's segments
    return visible_segments(idx[None, :, None], idx[None, None, :], l, seg2[:, :, None], seg2[:, None, :])[:, None]


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
