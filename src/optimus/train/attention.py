"""Attention backends for training the native ``DecoderLM`` on ``[x_noisy, x_clean]`` rows.

Both take the model's flattened q/k/v ([B*2L, H, D]) and apply the block-diffusion mask of
``objective.visible``: ``FlexBackend`` through flex_attention's block-sparse mask (GPU),
``MaskBackend`` through SDPA with a dense boolean mask (CPU, tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from optimus.train.objective import dense_mask, visible


def _heads_first(x: torch.Tensor, batch: int) -> torch.Tensor:
    return x.view(batch, -1, x.shape[1], x.shape[2]).transpose(1, 2)  # [B, H, S, D]


class MaskBackend:
    def __init__(self, batch: int, length: int, block: int, device: torch.device | str) -> None:
        self.batch = batch
        self.mask = dense_mask(length, block, device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (_heads_first(x, self.batch) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=True)
        return out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[3])


class FlexBackend:
    def __init__(self, batch: int, length: int, block: int, device: torch.device | str) -> None:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def mask_mod(b, h, q_idx, kv_idx):
            return visible(q_idx, kv_idx, length, block)

        self.batch = batch
        self.block_mask = create_block_mask(mask_mod, None, None, 2 * length, 2 * length, device=device)
        self._flex = flex_attention

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (_heads_first(x, self.batch) for x in (q, k, v))
        out = self._flex(q, k, v, block_mask=self.block_mask, enable_gqa=True)
        return out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[3])
