"""Random-weight models at published shapes (dense 8B, MoE llada2-mini and sdar-30b-a3b) for the
offline benchmark (no tokenizer).

The shapes and the random initialisation live in :mod:`optimus.models.shapes`, shared with the
loader's ``random:<shape>`` models (which ``optimus serve`` runs with a real tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from optimus.models.shapes import SHAPES, random_shape_model
from optimus.models.transformer import DecoderLM

__all__ = ["SHAPES", "NullTokenizer", "RandomModel", "random_model"]


class NullTokenizer:
    """Decodes nothing: throughput runs never look at text."""

    eos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        raise ValueError("random-weight benchmark models take token ids, not text")

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


@dataclass
class RandomModel:
    model: DecoderLM
    spec: object
    tokenizer: NullTokenizer
    path: str


def random_model(shape: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                 tiny: bool = False, **overrides) -> RandomModel:
    model = random_shape_model(shape, device, dtype, tiny=tiny, seed=seed, **overrides)
    return RandomModel(model, model.spec, NullTokenizer(), shape)
