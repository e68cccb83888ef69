"""Exactness of the engine against the reference decoders (greedy, fp32, tiny random models).

- Block-causal model, C = block: equals SDAR's block_diffusion_generate token for token.
- Causal model, `ar`: equals plain greedy autoregressive generation.
- Full-attention model, ``prefix-block`` cache mode, C = block, no suffix window: equals a naive no-cache decode under the
  mask the engine's cache implies (prompt one bidirectional group; each block sees the prompt,
  earlier blocks and itself). This is Fast-dLLM's prefix cache *without* its per-block
  full refresh and without the masks after the block, so it is not the Fast-dLLM output;
  the suffix-window test measures how much adding masks back changes the tokens.
"""

import pytest
import torch

from optimus.core.canvases import Canvases
from optimus.engine.llm import LLM
from optimus.core.params import SamplingParams
from optimus.models.dense import dense_forward
from optimus.reference import ar as ref_ar
from optimus.reference import sdar as ref_sdar
from fixtures.engine import tiny_loaded

PROMPTS = [[5, 9, 13], [3] * 11, list(range(20, 37)), [7]]




def _engine_answers(loaded, policy, params, **opts):
    llm = LLM(loaded=loaded, policy=policy, device="cpu", num_pages=512, page_size=4, **opts)
    return [list(o.token_ids) for o in llm.generate(PROMPTS, [params] * len(PROMPTS))]


@pytest.mark.parametrize("threshold", [0.9, 0.05])
def test_block_causal_full_chunk_equals_sdar_reference(threshold):
    loaded = tiny_loaded("sdar")
    block = loaded.spec.block_size
    gen = 2 * block + 3
    params = SamplingParams(max_tokens=gen, threshold=threshold, ignore_eos=True)
    got = _engine_answers(loaded, f"fixed:{block}", params)
    for prompt, answer in zip(PROMPTS, got):
        ref = ref_sdar.block_diffusion_generate(
            loaded.model, prompt, gen_length=gen, block_length=block, denoising_steps=block,
            remasking_strategy="low_confidence_dynamic", confidence_threshold=threshold)
        assert answer == ref.generated[0, :gen].tolist()


def test_causal_ar_equals_greedy_autoregressive():
    loaded = tiny_loaded("llama")
    params = SamplingParams(max_tokens=9, ignore_eos=True)
    got = _engine_answers(loaded, "ar", params)
    for prompt, answer in zip(PROMPTS, got):
        ref = ref_ar.generate(loaded.model, prompt, max_new_tokens=9)
        assert answer == ref.generated[0].tolist()


def _naive_prefix_block_decode(model, spec, prompt, gen, block, threshold):
    """No cache: every step reruns prompt + blocks so far under the engine's implied mask."""
    p = len(prompt)
    x = torch.tensor([prompt + [spec.mask_id] * gen])
    for b0 in range(p, p + gen, block):
        b1 = b0 + block
        pos = torch.arange(b1)[None]
        group = torch.where(pos < p, torch.zeros_like(pos), 1 + (pos - p) // block)
        mask = group[:, None, :] <= torch.maximum(group[:, :, None], torch.zeros_like(group[:, :, None]))
        mask = mask & ((group[:, None, :] == 0) | (group[:, :, None] > 0))
        while (x[0, b0:b1] == spec.mask_id).any():
            logits, _ = dense_forward(model, x[:, :b1], pos, mask)
            probs = torch.softmax(logits[0, b0:b1].float(), -1)
            conf, tok = probs.max(-1)
            masked = x[0, b0:b1] == spec.mask_id
            conf = torch.where(masked, conf, torch.full_like(conf, -1.0))
            pick = torch.nonzero(conf > threshold).flatten()
            if pick.numel() == 0:
                pick = conf.argmax()[None]
            x[0, b0 + pick] = tok[pick]
    return x[0, p:].tolist()


def test_full_attention_full_chunk_equals_prefix_block_decode():
    loaded = tiny_loaded("llada")
    block, gen = 8, 16
    params = SamplingParams(max_tokens=gen, threshold=0.2, ignore_eos=True)
    got = _engine_answers(loaded, f"fixed:{block}", params, block_size=block, cache_mode="prefix-block")
    for prompt, answer in zip(PROMPTS, got):
        assert answer == _naive_prefix_block_decode(loaded.model, loaded.spec, prompt, gen, block, 0.2)


def test_suffix_window_runs_and_changes_only_context():
    loaded = tiny_loaded("llada")
    params = SamplingParams(max_tokens=16, threshold=0.2, ignore_eos=True)
    base = _engine_answers(loaded, "fixed:8", params, block_size=8, cache_mode="prefix-block")
    wide = _engine_answers(loaded, "fixed:8", params, block_size=8, cache_mode="prefix-block", suffix_window=8)
    assert all(len(a) == 16 for a in wide)
    # Measured, not asserted equal: the window is extra context, so tokens may differ.
    changed = sum(a != b for a, b in zip(base, wide))
    print(f"suffix window 8 changed {changed}/{len(base)} answers")


@pytest.mark.parametrize("family,policy,opts", [
    ("llama", "ar", {}),
    ("sdar", "fixed:4", {}),
    ("llada", "fixed:4", {"block_size": 4, "cache_mode": "prefix-block"}),
    ("dream", "fixed:4", {"block_size": 4, "cache_mode": "prefix-block"}),  # row p predicts p + 1
    ("dream", "fixed:4", {"block_size": 4, "cache_mode": "dual-cache"}),
    # Chunks smaller than the block: the rows are recomputed in the segments they were stored in.
    ("sdar", "fixed:2", {}),
    ("sdar", "fixed:1", {}),
    ("llada", "fixed:2", {"block_size": 8, "cache_mode": "prefix-block"}),
    ("dream", "fixed:3", {"block_size": 8, "cache_mode": "prefix-block"}),
])
def test_preemption_keeps_greedy_answers_exact(family, policy, opts):
    """A cache too small for every request at once: requests are preempted, their pages freed
    and their rows recomputed into other pages, while the others' page lists grow and the batch
    order changes (the runner reuses page-table rows across steps). The answers equal an
    unpressed run's, at C = block and below it. The pressed run's canvases start too small for
    one request (Canvases compacts and grows while requests come and go)."""
    loaded = tiny_loaded(family)
    if family == "sdar":
        assert loaded.spec.block_size == 4
    params = [SamplingParams(max_tokens=24, threshold=0.3, ignore_eos=True)] * len(PROMPTS)
    roomy = LLM(loaded=loaded, policy=policy, device="cpu", num_pages=512, page_size=4, **opts)
    tight = LLM(loaded=loaded, policy=policy, device="cpu", num_pages=22, page_size=4, **opts)
    tight.engine.scheduler.canvases = canvases = Canvases(capacity=16, slots=1)
    expected = [list(o.token_ids) for o in roomy.generate(PROMPTS, params)]
    outs = tight.generate(PROMPTS, params)
    assert sum(o.stats.preemptions for o in outs) > 0
    assert canvases.tokens.size > 16 and len(canvases) == 0  # grew; every finished request released
    assert [list(o.token_ids) for o in outs] == expected
