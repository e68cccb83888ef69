"""One entry point through which the reference decoders call a :class:`DecoderLM`.

The decoders speak in contiguous position ranges of one canvas (``start`` = absolute position
of the first token passed); the adapter turns that into explicit positions and the attention
mask the spec's attention kind implies, runs :func:`dense_forward`, and counts forward passes.
Full attention passes no mask at all (as the published code does), so nothing is masked by
accident.
"""

from __future__ import annotations

import torch

from optimus.models.dense import CacheMode, DenseKVCache, attention_mask, dense_forward
from optimus.models.spec import AttentionKind, ModelSpec
from optimus.models.transformer import DecoderLM


class ModelCall:
    def __init__(self, model: DecoderLM, spec: ModelSpec | None = None, *,
                 block_size: int | None = None) -> None:
        self.model = model
        self.spec = spec if spec is not None else model.spec
        # Block-causal masks use this block (SDAR's decoder builds its mask from its own
        # block_length argument, not from the config).
        self.block_size = block_size if block_size is not None else self.spec.block_size
        self.forwards = 0

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    def mask_id(self, override: int | None = None) -> int:
        mask_id = override if override is not None else self.spec.mask_id
        if mask_id is None:
            raise ValueError(f"model family {self.spec.family!r} has no mask token: "
                             "diffusion decoding needs a diffusion model")
        return int(mask_id)

    def __call__(self, ids: torch.Tensor, start: int = 0, cache: DenseKVCache | None = None,
                 mode: CacheMode = CacheMode.READ, *, mask: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None) -> tuple[torch.Tensor, DenseKVCache]:
        """ids [B, L] at absolute positions start..start+L-1 (or ``positions`` [B, L]).

        READ / APPEND: the cache holds positions 0..S-1 and the new tokens follow it.
        REPLACE: the new tokens overwrite cache slots start..start+L-1.
        Returns (raw logits [B, L, V] in the model's dtype, cache after the call).
        """
        b, l = ids.shape
        if positions is None:
            positions = torch.arange(start, start + l, device=ids.device).expand(b, l)
        if mask is None:
            mask = self._mask(positions, cache, CacheMode(mode))
        self.forwards += 1
        return dense_forward(self.model, ids, positions, mask, cache, mode, replace_start=start)

    def _mask(self, q_pos: torch.Tensor, cache: DenseKVCache | None, mode: CacheMode) -> torch.Tensor | None:
        if self.spec.attention is AttentionKind.FULL:
            return None
        b = q_pos.shape[0]
        past = cache.length if cache is not None else 0
        cached = torch.arange(past, device=q_pos.device).expand(b, past)
        k_pos = cached if mode is CacheMode.REPLACE and past else torch.cat([cached, q_pos], dim=1)
        return attention_mask(self.spec.attention, q_pos, k_pos, self.block_size)


def as_batch(prompt_ids: torch.Tensor | list[int], device: torch.device) -> torch.Tensor:
    """A prompt as [B, P] long on ``device`` (a flat list or [P] tensor becomes one row)."""
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids[None, :]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"prompt must be a non-empty [P] or [B, P] tensor, got shape {tuple(ids.shape)}")
    return ids
