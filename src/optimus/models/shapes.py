"""Published model shapes, and random-weight models built at them straight on the device.

A shape is a ``config.json`` dict (no checkpoint exists for it here). Random weights make
confidences meaningless: such models exist to time the engine, never to judge outputs, so
their runs use fixed commit schedules or a replayed acceptance profile.
"""

from __future__ import annotations

import torch

from optimus.models.registry import spec_from_config
from optimus.models.spec import ModelSpec
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
    # LLaDA2.0-mini (config.json of inclusionAI/LLaDA2.0-mini): 16B total, ~1.4B active; 20
    # layers (layer 0 dense), 256 routed experts top-8 in 8 groups (4 kept) + 1 shared,
    # GQA 16/4, half-rotary heads; block-causal over blocks of 32, mask 156895.
    "llada2-mini": dict(model_type="llada2_moe", hidden_size=2048, intermediate_size=5120, num_hidden_layers=20,
                        num_attention_heads=16, num_key_value_heads=4, head_dim=128, partial_rotary_factor=0.5,
                        rope_theta=600000.0, rms_norm_eps=1e-6, use_qk_norm=True, use_qkv_bias=False,
                        num_experts=256, num_experts_per_tok=8, num_shared_experts=1, moe_intermediate_size=512,
                        n_group=8, topk_group=4, routed_scaling_factor=2.5, score_function="sigmoid",
                        norm_topk_prob=True, first_k_dense_replace=1, vocab_size=157184, pad_token_id=156892,
                        eos_token_id=156892, max_position_embeddings=32768, tie_word_embeddings=False),
    # SDAR-30B-A3B: the Qwen3-30B-A3B layout (48 layers, 128 experts top-8, expert size 768,
    # GQA 32/4), block-causal; block 32 here, like sdar-8b (the published chat model uses 4).
    "sdar-30b-a3b": dict(model_type="sdar_moe", hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                         num_key_value_heads=4, head_dim=128, intermediate_size=6144, num_experts=128,
                         num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                         decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936, rope_theta=1000000.0,
                         rms_norm_eps=1e-6, block_size=32, mask_token_id=151669, eos_token_id=151645,
                         max_position_embeddings=4096),
    # SmolLM2-135M-Instruct: the small real AR model (the smollm2-135m alias); its eos here lies past
    # the default tokenizer, as every shape's does (the real one is 2).
    "smollm2-135m": dict(model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, eos_token_id=49151,
                         max_position_embeddings=8192),
    # Llama-3-8B: the autoregressive baseline.
    "llama-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
                     rms_norm_eps=1e-5, eos_token_id=128001, max_position_embeddings=4096),
}

# Tiny shapes keep each family's layout and attention but shrink it to milliseconds on a CPU.
# Their vocabulary is larger than the default model's tokenizer (8192 ids) and their mask/eos
# ids lie past it, as at the full shapes, so a tiny model can serve that tokenizer's ids.
TINY_VOCAB = 9216


_TINY_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)


def tiny_overrides(shape: str) -> dict:
    """Config overrides that shrink ``shape`` (2 layers, width 64; MoE shapes keep 8 experts)."""
    model_type = SHAPES[shape]["model_type"]
    if model_type == "llada2_moe":
        return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, n_group=4, topk_group=2, vocab_size=TINY_VOCAB,
                    mask_token_id=TINY_VOCAB - 100, eos_token_id=TINY_VOCAB - 99, pad_token_id=TINY_VOCAB - 99,
                    **_TINY_MOE)
    if model_type == "sdar_moe":
        return dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    intermediate_size=128, vocab_size=TINY_VOCAB, mask_token_id=TINY_VOCAB - 100,
                    eos_token_id=TINY_VOCAB - 99, **_TINY_MOE)
    if model_type == "llada":
        return dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=128,
                    embedding_size=TINY_VOCAB, vocab_size=TINY_VOCAB, mask_token_id=TINY_VOCAB - 100,
                    eos_token_id=TINY_VOCAB - 99, pad_token_id=TINY_VOCAB - 99)
    return dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                intermediate_size=128, vocab_size=TINY_VOCAB, mask_token_id=TINY_VOCAB - 100,
                eos_token_id=TINY_VOCAB - 99)


def shape_config(shape: str, tiny: bool = False) -> dict:
    """The config.json dict of a named shape; ``tiny`` shrinks it (tests, CPU smoke runs)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known shapes: {', '.join(sorted(SHAPES))}")
    return {**SHAPES[shape], **(tiny_overrides(shape) if tiny else {})}


@torch.no_grad()
def random_decoder(spec: ModelSpec, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> DecoderLM:
    """A :class:`DecoderLM` with N(0, 0.02) weights and unit norms, built in ``dtype`` on
    ``device`` (never a full fp32 copy: an 8B model takes its 16 GB of bf16 and no more)."""
    with torch.device("meta"):
        model = DecoderLM(spec)
    model = model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    for module in model.modules():  # non-persistent buffers (RoPE's fp32 inv_freq) are not parameters
        if hasattr(module, "reset_buffers"):
            module.reset_buffers(device)
    return model.eval()


def random_shape_model(shape: str, device: str | torch.device, dtype: torch.dtype, tiny: bool = False,
                       seed: int = 0, **overrides) -> DecoderLM:
    """``random_decoder`` at a named shape (plus config ``overrides``)."""
    return random_decoder(spec_from_config({**shape_config(shape, tiny), **overrides}), device, dtype, seed)
