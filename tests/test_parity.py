"""Forward parity of our DecoderLM against transformers' Llama / Qwen2 / Qwen3 (fp32, 1e-4).

Each family maps onto the transformers module with the same computation: LLaDA -> Llama
(bidirectional), Dream -> Qwen2 (bidirectional, shifted logits), SDAR -> Qwen3
(block-causal), and the causal LMs onto themselves. Masks are passed to transformers as an
explicit 4D additive mask (returned as-is by its masking utils) with eager attention, so the
reference computes attention without SDPA.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from optimus.models.loader import load_model  # noqa: E402
from optimus.models.dense import CacheMode, attention_mask, dense_forward, shift_logits  # noqa: E402
from optimus.models.spec import AttentionKind, ModelSpec  # noqa: E402

from conftest import ALL_FAMILIES  # noqa: E402

ATOL = 1e-4
_HF_CLASSES = {"llada": "Llama", "llama": "Llama", "dream": "Qwen2", "qwen2": "Qwen2",
               "sdar": "Qwen3", "qwen3": "Qwen3"}


def hf_reference(model: torch.nn.Module, spec: ModelSpec):
    """The transformers model of the same computation, holding our weights."""
    name = _HF_CLASSES[spec.family]
    arch = spec.arch
    config = getattr(transformers, f"{name}Config")(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads, head_dim=arch.head_dim, rms_norm_eps=arch.rms_eps,
        rope_theta=arch.rope_theta, max_position_embeddings=arch.max_position,
        tie_word_embeddings=arch.tie_embeddings, attention_bias=arch.qkv_bias, hidden_act="silu")
    config._attn_implementation = "eager"
    hf = getattr(transformers, f"{name}ForCausalLM")(config).eval()
    hf.load_state_dict(model.state_dict(), strict=True)  # same names: our layout is HF Llama/Qwen
    return hf


def additive(mask: torch.Tensor) -> torch.Tensor:
    """Bool [B, L, S] (True = attend) -> float [B, 1, L, S] for transformers' eager attention."""
    out = torch.zeros(mask.shape, dtype=torch.float32)
    out.masked_fill_(~mask, torch.finfo(torch.float32).min)
    return out[:, None]


def hf_logits(hf, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=ids, position_ids=positions, attention_mask=additive(mask), use_cache=False).logits


def full_mask(spec: ModelSpec, positions: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    return attention_mask(spec.attention, positions, positions, spec.block_size, valid)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_logits_match_transformers(family, tiny_model):
    model, spec = tiny_model(family)
    hf = hf_reference(model, spec)
    ids = torch.randint(0, 320, (2, 11))
    positions = torch.arange(11).expand(2, 11)
    mask = full_mask(spec, positions)
    ours, _ = dense_forward(model, ids, positions, mask)
    ref = hf_logits(hf, ids, positions, mask)
    assert ours.shape == ref.shape == (2, 11, spec.arch.vocab_size)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    assert ref.std() > 0.1  # the comparison is not between two near-constant tensors


def test_masks_have_the_intended_shape():
    """The masks the parity tests rely on: full, causal, and SDAR's 0-aligned block-causal."""
    pos = torch.arange(6)[None]
    assert attention_mask(AttentionKind.FULL, pos, pos).all()
    assert torch.equal(attention_mask(AttentionKind.CAUSAL, pos, pos)[0], torch.ones(6, 6).tril().bool())
    block = attention_mask(AttentionKind.BLOCK_CAUSAL, pos, pos, block_size=4)[0]
    assert block[0, 3] and block[3, 0] and not block[3, 4] and block[4, 5] and block[5, 0]


def test_attention_kind_changes_logits(tiny_model):
    """Guard: the mask really reaches attention (a full mask and a causal one disagree)."""
    model, spec = tiny_model("llada")
    ids = torch.randint(0, 320, (1, 8))
    pos = torch.arange(8)[None]
    full, _ = dense_forward(model, ids, pos, attention_mask(AttentionKind.FULL, pos, pos))
    causal, _ = dense_forward(model, ids, pos, attention_mask(AttentionKind.CAUSAL, pos, pos))
    assert (full[0] - causal[0]).abs().amax(-1).min() > 1e-2  # every row changes (2 layers mix rows)


def test_dream_shift_against_transformers(tiny_model):
    """Dream: the logits for token i are Qwen2's raw row i-1; row 0 reads its own row."""
    model, spec = tiny_model("dream")
    assert spec.logit_shift
    hf = hf_reference(model, spec)
    ids = torch.randint(0, 320, (1, 9))
    pos = torch.arange(9)[None]
    mask = full_mask(spec, pos)
    shifted = shift_logits(dense_forward(model, ids, pos, mask)[0])
    raw = hf_logits(hf, ids, pos, mask)
    torch.testing.assert_close(shifted[0, 0], raw[0, 0], atol=ATOL, rtol=0)
    for i in range(1, 9):
        torch.testing.assert_close(shifted[0, i], raw[0, i - 1], atol=ATOL, rtol=0)


def test_left_padded_batch_matches_transformers(tiny_model):
    """Dream-style left padding: positions count real tokens, padding keys are masked out."""
    model, spec = tiny_model("dream")
    hf = hf_reference(model, spec)
    ids = torch.randint(0, 320, (2, 8))
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, :3] = False
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    mask = full_mask(spec, pos, valid)
    mask |= torch.eye(8, dtype=torch.bool)[None]  # padding rows attend to themselves (no empty rows)
    ours, _ = dense_forward(model, ids, pos, mask)
    ref = hf_logits(hf, ids, pos, mask)
    torch.testing.assert_close(ours[valid], ref[valid], atol=ATOL, rtol=0)
    alone, _ = dense_forward(model, ids[1:, 3:], torch.arange(5)[None], full_mask(spec, torch.arange(5)[None]))
    torch.testing.assert_close(ours[1, 3:], alone[0], atol=ATOL, rtol=0)  # padding changes nothing


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_checkpoint_loads_in_transformers_identically(family, tiny_checkpoint):
    """Our tiny causal checkpoints are valid HF checkpoints: transformers loads the same files
    (config + sharded safetensors) to the same logits as our loader."""
    path = tiny_checkpoint(family, shards=2)
    ours = load_model(path, device="cpu", progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager").eval()
    ids = torch.randint(0, 320, (1, 10))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    pos = torch.arange(10)[None]
    logits, _ = dense_forward(ours.model, ids, pos, full_mask(ours.spec, pos))
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)


# ------------------------------------------------------------------ KV cache

def _prefix_mask(spec: ModelSpec, total: int, prefix: int) -> torch.Tensor:
    """The model's mask, except that cached prefix rows never see the suffix (what a cache of
    the prefix implies; a no-op for causal and block-aligned block-causal masks)."""
    pos = torch.arange(total)[None]
    mask = full_mask(spec, pos).clone()
    mask[:, :prefix, prefix:] = False
    return mask


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_kv_cache_append_then_read_equals_full_forward(family, tiny_model):
    model, spec = tiny_model(family)
    total, prefix = 12, 8  # 8 = two SDAR blocks of 4: block-aligned
    ids = torch.randint(0, 320, (2, total))
    pos = torch.arange(total).expand(2, total)
    mask = _prefix_mask(spec, total, prefix)
    full, _ = dense_forward(model, ids, pos, mask)
    _, cache = dense_forward(model, ids[:, :prefix], pos[:, :prefix], mask[:, :prefix, :prefix],
                             mode=CacheMode.APPEND)
    assert cache.length == prefix
    rest, after = dense_forward(model, ids[:, prefix:], pos[:, prefix:], mask[:, prefix:], cache=cache,
                                mode=CacheMode.READ)
    assert after is cache and after.length == prefix  # READ leaves the cache alone
    torch.testing.assert_close(rest, full[:, prefix:], atol=ATOL, rtol=0)
    if spec.attention is not AttentionKind.FULL:  # the unmodified model mask: cache is exact
        plain, _ = dense_forward(model, ids, pos, full_mask(spec, pos))
        torch.testing.assert_close(rest, plain[:, prefix:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llada", "sdar"])
def test_kv_cache_replace_block_equals_full_forward(family, tiny_model):
    """Dual-cache step: rewriting a block's slots with the same tokens reproduces its rows."""
    model, spec = tiny_model(family)
    ids = torch.randint(0, 320, (1, 12))
    pos = torch.arange(12)[None]
    mask = full_mask(spec, pos)
    full, cache = dense_forward(model, ids, pos, mask, mode=CacheMode.APPEND)
    block, new_cache = dense_forward(model, ids[:, 4:8], pos[:, 4:8], mask[:, 4:8], cache=cache,
                                     mode=CacheMode.REPLACE, replace_start=4)
    torch.testing.assert_close(block, full[:, 4:8], atol=ATOL, rtol=0)
    assert new_cache.length == 12
