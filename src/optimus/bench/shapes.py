"""Random-weight models at published 8B shapes, built straight on the device (no checkpoint).

Random weights make confidences meaningless, so throughput runs use fixed commit schedules
or a replayed acceptance profile; they exist to time the engine, never to judge outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from optimus.models.registry import spec_from_config
from optimus.models.transformer import DecoderLM

SHAPES: dict[str, dict] = {
    # LLaDA-8B: MHA, full attention, untied head, vocab 126464.
    "llada-8b": dict(model_type="llada", d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                     mlp_hidden_size=12288, embedding_size=126464, vocab_size=126464, rope_theta=500000.0,
                     rms_norm_eps=1e-5, mask_token_id=126336, eos_token_id=126081, pad_token_id=126081,
                     max_sequence_length=4096),
    # SDAR-8B-Chat-b32: Qwen3 layout, GQA 32/8, block-causal.
    "sdar-8b": dict(model_type="sdar", hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936,
                    rope_theta=1000000.0, rms_norm_eps=1e-6, block_size=32, mask_token_id=151669,
                    eos_token_id=151645, max_position_embeddings=4096),
    # Llama-3-8B: the autoregressive baseline.
    "llama-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
                     rms_norm_eps=1e-5, eos_token_id=128001, max_position_embeddings=4096),
}


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


@torch.no_grad()
def random_model(shape: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                 **overrides) -> RandomModel:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")
    spec = spec_from_config({**SHAPES[shape], **overrides})
    with torch.device("meta"):
        model = DecoderLM(spec)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    model.model.rotary.inv_freq = _inv_freq(spec, device)
    return RandomModel(model.eval(), spec, NullTokenizer(), shape)


def _inv_freq(spec, device) -> torch.Tensor:
    d = spec.arch.head_dim
    return 1.0 / (spec.arch.rope_theta ** (torch.arange(0, d, 2, device=device).float() / d))
