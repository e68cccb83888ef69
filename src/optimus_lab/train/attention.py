"""Attention for training the native ``DecoderLM`` on ``[x_noisy, x_clean]`` rows.

A *mask maker* turns the step's segment ids [B, L] (``objective.block_segments`` or
``chunk_segments``) into a mask argument; ``TrainBackend(mask, batch)`` applies it to the
model's flattened q/k/v ([B*2L, H, D]). ``FlexMasks`` gives flex_attention block-sparse masks
(GPU); ``DenseMasks`` gives SDPA boolean masks (CPU, tests, fallback).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from optimus_lab.train.objective import block_segments, dense_mask, dense_segment_mask, visible_segments


def _heads_first(x: torch.Tensor, batch: int) -> torch.Tensor:
    return x.view(batch, -1, x.shape[1], x.shape[2]).transpose(1, 2)  # [B, H, S, D]


class TrainBackend:
    """The model's AttentionBackend for one training forward; ``mask`` is a BlockMask or a
    boolean tensor broadcastable to [B, H, 2L, 2L]."""

    live_rows = None  # every row is a token: no padding

    def __init__(self, mask, batch: int) -> None:
        self.mask, self.batch = mask, batch

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (_heads_first(x, self.batch) for x in (q, k, v))
        if isinstance(self.mask, torch.Tensor):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=True)
        else:
            from torch.nn.attention.flex_attention import flex_attention
            out = flex_attention(q, k, v, block_mask=self.mask, enable_gqa=True)
        return out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[3])


class DenseMasks:
    def __init__(self, batch: int, length: int, block: int, device) -> None:
        self.static = dense_mask(length, block, device)  # the plain objective's shared mask

    def make(self, segments: torch.Tensor | None) -> torch.Tensor:
        return self.static if segments is None else dense_segment_mask(segments)


class FlexMasks:
    """Block-sparse masks from one persistent segment buffer, so every step's BlockMask carries
    the same mask_mod (compiled code is reused; only the block tables change)."""

    def __init__(self, batch: int, length: int, block: int, device) -> None:
        from torch.nn.attention.flex_attention import create_block_mask
        self._create, self.length, self.batch, self.device = create_block_mask, length, batch, device
        self.block_seg = block_segments(batch, length, block, device).repeat(1, 2)  # [B, 2L]
        self.seg = self.block_seg.clone()
        seg = self.seg

        def mask_mod(b, h, q_idx, kv_idx):  # a plain function: create_block_mask rejects methods
            return visible_segments(q_idx, kv_idx, length, seg[b, q_idx], seg[b, kv_idx])

        self._mask_mod = mask_mod
        self.static = self._build()

    def _build(self):
        n = 2 * self.length
        try:
            return self._create(self._mask_mod, self.batch, None, n, n, device=self.device, _compile=True)
        except TypeError:  # torch without the _compile switch
            return self._create(self._mask_mod, self.batch, None, n, n, device=self.device)

    def make(self, segments: torch.Tensor | None):
        if segments is None:
            self.seg.copy_(self.block_seg)
            return self.static
        self.seg.copy_(segments.repeat(1, 2))
        return self._build()
