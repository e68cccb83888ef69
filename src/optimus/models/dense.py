"""Dense (padded-batch) attention backend with an optional per-layer KV cache.

Used by the reference decoders and the parity tests: a batch of ``B`` rows of ``L`` new
tokens each attends to an optional cache of ``S_past`` positions plus itself, under an
explicit boolean mask (True = may attend). The engine uses the paged backend instead.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from optimus.models.spec import AttentionKind
from optimus.models.transformer import DecoderLM


class CacheMode(str, enum.Enum):
    READ = "read"  # attend to cat(cache, new); leave the cache as it is
    APPEND = "append"  # attend to cat(cache, new); store cat(cache, new)
    REPLACE = "replace"  # write new K/V into cache slots [start, start+L); attend to the whole cache


@dataclass
class DenseKVCache:
    """Per-layer K/V, each [B, Hkv, S, D]."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def truncate(self, length: int) -> "DenseKVCache":
        return DenseKVCache([k[:, :, :length] for k in self.keys], [v[:, :, :length] for v in self.values])


def attention_mask(kind: AttentionKind, q_pos: torch.Tensor, k_pos: torch.Tensor,
                   block_size: int | None = None, k_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask [B, L, S] from absolute positions q_pos [B, L] and k_pos [B, S].

    Block-causal blocks are aligned to absolute position 0 (SDAR's convention).
    ``k_valid`` [B, S] marks real (non-padding) keys.
    """
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    if kind is AttentionKind.FULL:
        mask = torch.ones(q.shape[0], q.shape[1], k.shape[2], dtype=torch.bool, device=q_pos.device)
    elif kind is AttentionKind.CAUSAL:
        mask = k <= q
    else:
        if not block_size:
            raise ValueError("block-causal attention needs a block size")
        mask = torch.div(k, block_size, rounding_mode="floor") <= torch.div(q, block_size, rounding_mode="floor")
    if k_valid is not None:
        mask = mask & k_valid[:, None, :]
    return mask


class DenseBackend:
    live_rows = None  # every row is a token: no padding

    def __init__(self, batch: int, length: int, mask: torch.Tensor | None,
                 cache: DenseKVCache | None = None, mode: CacheMode = CacheMode.READ,
                 replace_start: int = 0) -> None:
        self.batch, self.length, self.mask = batch, length, mask
        self.cache = cache if cache is not None else DenseKVCache()
        self.mode, self.replace_start = CacheMode(mode), replace_start
        self.new_cache = DenseKVCache()

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, l = self.batch, self.length
        hq, d = q.shape[1], q.shape[2]
        q = q.view(b, l, hq, d).transpose(1, 2)
        k = k.view(b, l, -1, d).transpose(1, 2)
        v = v.view(b, l, -1, d).transpose(1, 2)
        if layer < len(self.cache.keys):
            past_k, past_v = self.cache.keys[layer], self.cache.values[layer]
            if self.mode is CacheMode.REPLACE:
                s = self.replace_start
                k_all, v_all = past_k.clone(), past_v.clone()
                k_all[:, :, s:s + l], v_all[:, :, s:s + l] = k, v
            else:
                k_all, v_all = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        else:
            k_all, v_all = k, v
        self.new_cache.keys.append(k_all)
        self.new_cache.values.append(v_all)
        groups = hq // k_all.shape[1]
        if groups > 1:
            k_all = k_all.repeat_interleave(groups, dim=1)
            v_all = v_all.repeat_interleave(groups, dim=1)
        mask = None if self.mask is None else self.mask[:, None, :, :]
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        return out.transpose(1, 2).reshape(b * l, hq, d)


def dense_forward(model: DecoderLM, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                  mask: torch.Tensor | None = None, cache: DenseKVCache | None = None,
                  mode: CacheMode = CacheMode.READ, replace_start: int = 0,
                  ) -> tuple[torch.Tensor, DenseKVCache]:
    """input_ids [B, L] -> (raw logits [B, L, V], the cache after this call).

    Logits are unshifted: callers that serve a shifted-logit model (Dream) shift them.
    With mode APPEND or REPLACE the returned cache holds the new K/V; with READ it is the
    input cache unchanged.
    """
    b, l = input_ids.shape
    mode = CacheMode(mode)
    if positions is None:
        start = cache.length if (cache is not None and mode is not CacheMode.REPLACE) else replace_start
        positions = torch.arange(start, start + l, device=input_ids.device).expand(b, l)
    backend = DenseBackend(b, l, mask, cache, mode, replace_start)
    hidden = model(input_ids.reshape(-1), positions.reshape(-1), backend)
    logits = model.logits(hidden).view(b, l, -1)
    out_cache = cache if mode is CacheMode.READ and cache is not None else backend.new_cache
    return logits, out_cache


def shift_logits(logits: torch.Tensor) -> torch.Tensor:
    """Dream's convention: row i predicts from row i-1, row 0 from itself. [B, L, V]."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
