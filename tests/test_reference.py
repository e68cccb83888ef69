"""Reference decoders: invariants, provable equalities between variants, hand-checked cases,
and naive transcriptions of the published LLaDA and SDAR loops (tiny random models, CPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from optimus.models.dense import attention_mask, dense_forward, shift_logits
from optimus.models.spec import AttentionKind
from optimus.models.transformer import DecoderLM
from optimus.reference import adapter, ar, dream, fast_dllm, llada, sdar
from optimus.reference.algorithms import DecodeSettings, answer_ids, decode, natural_algorithm
from optimus.reference.rules import Factor, Threshold, TopKSchedule
from fixtures import make_tiny_model

PROMPT = torch.tensor([[5, 6, 7, 8, 9]])
FAST_VARIANTS = (fast_dllm.generate, fast_dllm.generate_with_prefix_cache, fast_dllm.generate_with_dual_cache)


@pytest.fixture(scope="module")
def llada_model():
    return make_tiny_model("llada")[0]


@pytest.fixture(scope="module")
def sdar_model():
    return make_tiny_model("sdar")[0]


@pytest.fixture(scope="module")
def dream_model():
    return make_tiny_model("dream")[0]


def _inputs_seen(monkeypatch) -> list[torch.Tensor]:
    """Record the token ids of every forward the reference decoders make."""
    seen: list[torch.Tensor] = []
    real = adapter.dense_forward

    def spy(model, ids, *args, **kwargs):
        seen.append(ids.clone())
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr(adapter, "dense_forward", spy)
    return seen


# ------------------------------------------------------------------ schedules and rules

def test_transfer_schedules_sum_to_the_block_and_front_load_the_remainder():
    for n in range(0, 37):
        for steps in range(1, 13):
            row = llada.get_num_transfer_tokens(torch.ones(1, n, dtype=torch.bool), steps)[0].tolist()
            assert sum(row) == n and len(row) == steps
            assert max(row) - min(row) <= 1 and row == sorted(row, reverse=True)
            assert sdar.get_num_transfer_tokens(n, steps).tolist() == row


def test_threshold_rule_commits_the_confident_and_always_at_least_one():
    mask = torch.tensor([[True, True, True, True]])
    low = torch.tensor([[0.2, 0.3, 0.1, 0.25]])
    assert Threshold(0.9).select(low, mask, 0).tolist() == [[False, True, False, False]]
    high = torch.tensor([[0.95, 0.3, 0.92, 0.9]])
    assert Threshold(0.9).select(high, mask, 0).tolist() == [[True, False, True, True]]
    partial = torch.tensor([[True, False, True, False]])
    conf = torch.where(partial, low, -torch.inf)
    assert Threshold(0.9).select(conf, partial, 0).tolist() == [[True, False, False, False]]


def test_factor_rule_and_its_published_last_candidate_quirk():
    mask = torch.ones(1, 4, dtype=torch.bool)
    # ranked 0.9, 0.8, 0.5, 0.1 against bars -1, 2/3, 3/4, 4/5: the third fails -> two commit
    conf = torch.tensor([[0.9, 0.5, 0.8, 0.1]])
    assert Factor(1.0).select(conf, mask, 0).tolist() == [[True, False, True, False]]
    # ranked 0.9, 0.8, 0.1 against -1, 2/3, 3/4: only the last fails, and the scan takes it too
    conf3, mask3 = torch.tensor([[0.9, 0.8, 0.1]]), torch.ones(1, 3, dtype=torch.bool)
    assert Factor(1.0).select(conf3, mask3, 0).tolist() == [[True, True, True]]
    # a single masked position always commits
    one = torch.tensor([[False, True, False]])
    assert Factor(1.0).select(torch.where(one, 0.01, -torch.inf), one, 0).tolist() == [[False, True, False]]


def test_topk_schedule_follows_the_counts():
    counts = torch.tensor([[2, 1]])
    conf = torch.tensor([[0.1, 0.7, 0.3, 0.9]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert TopKSchedule(counts).select(conf, mask, 0).tolist() == [[False, True, False, True]]
    assert TopKSchedule(counts).select(conf, mask, 1).tolist() == [[False, False, False, True]]


# ------------------------------------------------------------------ invariants

def _diffusion_runs(llada_model, sdar_model, dream_model):
    yield llada.generate(llada_model, PROMPT, steps=8, gen_length=8, block_length=4)
    yield llada.generate(llada_model, PROMPT, steps=4, gen_length=8, block_length=4, remasking="random",
                         temperature=1.0, cfg_scale=1.5)
    for variant in FAST_VARIANTS:
        for rule in ({}, {"threshold": 0.9}, {"factor": 1.0}):
            yield variant(llada_model, PROMPT, steps=8, gen_length=8, block_length=4, **rule)
    for strategy in sdar.STRATEGIES:
        yield sdar.block_diffusion_generate(sdar_model, PROMPT, gen_length=7, remasking_strategy=strategy)
    for alg in dream.ALGORITHMS:
        yield dream.diffusion_generate(dream_model, PROMPT, max_new_tokens=8, steps=4, alg=alg)


def test_no_mask_is_left_and_the_prompt_is_kept(llada_model, sdar_model, dream_model):
    masks = [m.spec.mask_id for m in (llada_model, sdar_model, dream_model)]
    for result in _diffusion_runs(llada_model, sdar_model, dream_model):
        ids = result.generated
        assert ids.shape[1] >= 7 and torch.equal(result.sequence[:, :5], PROMPT)
        assert not bool(torch.isin(ids, torch.tensor(masks)).any())
        assert result.stats.tokens == ids.shape[1] and result.stats.steps >= 1


def test_positions_after_the_current_block_never_commit_early(llada_model, monkeypatch):
    mask_id = llada_model.spec.mask_id
    for run in (lambda: llada.generate(llada_model, PROMPT, steps=12, gen_length=12, block_length=4),
                lambda: fast_dllm.generate(llada_model, PROMPT, steps=12, gen_length=12, block_length=4,
                                           threshold=1e-6)):
        seen = _inputs_seen(monkeypatch)
        final = run().sequence
        states = seen + [final]
        for before, after in zip(states, states[1:]):
            masked = (before[0, 5:] == mask_id).nonzero()[:, 0]
            block_end = 5 + (int(masked[0]) // 4 + 1) * 4
            changed = (before != after)[0].nonzero()[:, 0]
            assert len(changed) >= 1 and int(changed.max()) < block_end
            assert bool((after[0, block_end:] == mask_id).all())


def test_a_tiny_threshold_finishes_each_block_in_one_step(llada_model):
    for variant in FAST_VARIANTS:
        result = variant(llada_model, PROMPT, steps=12, gen_length=12, block_length=4, threshold=1e-6)
        assert result.stats.steps == 3 and result.stats.tokens == 12


def test_temperature_zero_is_deterministic_and_seeded_sampling_repeats(llada_model, sdar_model, dream_model):
    runs = [lambda: llada.generate(llada_model, PROMPT, steps=8, gen_length=8, block_length=4),
            lambda: fast_dllm.generate_with_dual_cache(llada_model, PROMPT, steps=8, gen_length=8,
                                                       block_length=4, threshold=0.5),
            lambda: sdar.block_diffusion_generate(sdar_model, PROMPT, gen_length=8),
            lambda: dream.diffusion_generate(dream_model, PROMPT, max_new_tokens=8, steps=4)]
    for run in runs:
        assert torch.equal(run().sequence, run().sequence)
    sampled = [lambda: llada.generate(llada_model, PROMPT, steps=8, gen_length=8, block_length=4, temperature=1.0),
               lambda: fast_dllm.generate_with_prefix_cache(llada_model, PROMPT, steps=8, gen_length=8,
                                                            block_length=4, temperature=0.7),
               lambda: sdar.block_diffusion_generate(sdar_model, PROMPT, gen_length=8, temperature=1.0, top_p=0.9),
               lambda: dream.diffusion_generate(dream_model, PROMPT, max_new_tokens=8, steps=4, temperature=0.5)]
    for run in sampled:
        torch.manual_seed(123)
        first = run().sequence
        torch.manual_seed(123)
        assert torch.equal(first, run().sequence)


# ------------------------------------------------------------------ equalities that must hold

def test_fast_dllm_topk_without_cache_is_llada(llada_model):
    """Same schedule and selection; only the confidence precision differs (fp32 model: the
    float32 logsumexp and the model-dtype softmax rank positions alike)."""
    for kwargs in ({"steps": 8, "gen_length": 8, "block_length": 4}, {"steps": 6, "gen_length": 12, "block_length": 4}):
        assert torch.equal(llada.generate(llada_model, PROMPT, **kwargs).sequence,
                           fast_dllm.generate(llada_model, PROMPT, **kwargs).sequence)


def test_caches_are_exact_for_block_causal_attention():
    """With block-causal attention whose blocks coincide with Fast-dLLM's (prompt a whole number
    of blocks), nothing before a block ever attends to it or to later positions, and the block
    never attends to later positions, so prefix and dual caches reproduce the no-cache run.
    (With full attention they are approximations: the prompt's K/V would change as the canvas
    fills, so no such equality is claimed.)"""
    base, spec = make_tiny_model("llada")
    spec = dataclasses.replace(spec, attention=AttentionKind.BLOCK_CAUSAL, block_size=4)
    model = DecoderLM(spec)
    model.load_state_dict(base.state_dict())
    model.eval()
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    for rule in ({}, {"threshold": 0.05}, {"factor": 2.0}):
        runs = [v(model, prompt, steps=12, gen_length=12, block_length=4, **rule) for v in FAST_VARIANTS]
        assert torch.equal(runs[0].sequence, runs[1].sequence)
        assert torch.equal(runs[0].sequence, runs[2].sequence)


def test_ar_with_cache_equals_ar_without(monkeypatch):
    model, _ = make_tiny_model("qwen3")
    for kwargs in ({}, {"temperature": 0.8, "top_k": 20}):
        torch.manual_seed(7)
        cached = ar.generate(model, PROMPT, max_new_tokens=10, **kwargs)
        torch.manual_seed(7)
        plain = ar.generate(model, PROMPT, max_new_tokens=10, use_cache=False, **kwargs)
        assert torch.equal(cached.sequence, plain.sequence)
        assert cached.stats.tokens == 10 and cached.stats.steps == 10
    seen = _inputs_seen(monkeypatch)
    ar.generate(model, PROMPT, max_new_tokens=4)
    assert [s.shape[1] for s in seen] == [5, 1, 1, 1]  # prefill, then one token per step


def test_ar_stops_on_a_stop_id_and_keeps_it():
    model, _ = make_tiny_model("llama")
    first = int(ar.generate(model, PROMPT, max_new_tokens=6).generated[0, 2])
    stopped = ar.generate(model, PROMPT, max_new_tokens=6, stop_ids=(first,))
    ids = stopped.generated[0].tolist()
    assert ids[-1] == first and first not in ids[:-1] and len(ids) <= 3


# ------------------------------------------------------------------ hand-checked cases

def _block_causal_logits(model, ids: torch.Tensor, block: int) -> torch.Tensor:
    pos = torch.arange(ids.shape[1])[None]
    return dense_forward(model, ids, pos, attention_mask(AttentionKind.BLOCK_CAUSAL, pos, pos, block))[0][0]


def test_sdar_single_block_in_one_step_is_the_argmax_of_one_forward(sdar_model, monkeypatch):
    mask_id = sdar_model.spec.mask_id
    prompt = torch.tensor([[5, 6, 7, 8]])
    seen = _inputs_seen(monkeypatch)
    result = sdar.block_diffusion_generate(sdar_model, prompt, gen_length=4, denoising_steps=1,
                                           remasking_strategy="low_confidence_static")
    canvas = torch.cat([prompt, torch.full((1, 4), mask_id)], dim=1)
    expected = _block_causal_logits(sdar_model, canvas, 4)[4:].argmax(-1)
    assert result.generated[0].tolist() == expected.tolist()
    assert [s.shape[1] for s in seen] == [4, 4, 4]  # prefill, one denoising step, store
    assert result.stats.steps == 3 and result.stats.tokens == 4


def test_sdar_sequential_commits_left_to_right_from_the_prompt_tail(sdar_model):
    """P = 6, B = 4: block 0 is prefilled, block 1 holds the tail (2 tokens) and 2 masks, then
    one more block; each step commits the leftmost mask with the argmax given the current block."""
    mask_id = sdar_model.spec.mask_id
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10]])
    result = sdar.block_diffusion_generate(sdar_model, prompt, gen_length=6, remasking_strategy="sequential")
    seq = torch.cat([prompt, torch.full((1, 6), mask_id)], dim=1)
    for pos in range(6, 12):
        end = (pos // 4 + 1) * 4
        seq[0, pos] = _block_causal_logits(sdar_model, seq[:, :end], 4)[pos].argmax()
    assert result.sequence.shape[1] == 12 and torch.equal(result.sequence, seq)
    # forwards: prefill 1; block 1: 2 steps + store; block 2: 4 steps + store
    assert result.stats.steps == 1 + 3 + 5 and result.stats.tokens == 6


def test_sdar_never_recommits_a_position(sdar_model, monkeypatch):
    """Quotas that exceed the masks left (the prompt tail shares the first decode block) must
    not spill onto the tail or onto tokens committed earlier in the block."""
    mask_id = sdar_model.spec.mask_id
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    for strategy, steps in (("low_confidence_static", 2), ("low_confidence_dynamic", 2), ("low_confidence_static", 1)):
        seen = _inputs_seen(monkeypatch)
        # steps=2: quotas [2, 2] (steps=1: [4]) but the first decode block only has 3 masks
        result = sdar.block_diffusion_generate(sdar_model, prompt, gen_length=7, denoising_steps=steps,
                                               remasking_strategy=strategy, confidence_threshold=0.99)
        assert torch.equal(result.sequence[:, :5], prompt) and result.stats.tokens == 7
        groups, current = [], []  # denoising inputs of each decode block, ending with its store
        for ids in seen[1:]:
            current.append(ids[0])
            if not bool((ids == mask_id).any()):
                groups, current = groups + [current], []
        assert len(groups) == 2 and not current
        for group in groups:
            for before, after in zip(group, group[1:]):
                kept = before != mask_id
                assert torch.equal(after[kept], before[kept])
        monkeypatch.undo()


def test_sdar_stops_after_the_block_holding_a_stop_id(sdar_model):
    full = sdar.block_diffusion_generate(sdar_model, PROMPT, gen_length=11)
    stop = int(full.generated[0, 3])  # the first token of the second decode block
    stopped = sdar.block_diffusion_generate(sdar_model, PROMPT, gen_length=11, stop_ids=(stop,))
    first_hit = full.generated[0].tolist().index(stop)
    block_end = (5 + first_hit) // 4 * 4 + 4
    assert torch.equal(stopped.sequence[:, :block_end], full.sequence[:, :block_end])
    assert bool((stopped.sequence[0, block_end:] == sdar_model.spec.mask_id).all())


def test_dream_single_step_is_the_argmax_of_the_shifted_logits(dream_model):
    canvas = torch.cat([PROMPT, torch.full((1, 6), dream_model.spec.mask_id)], dim=1)
    logits = shift_logits(dense_forward(dream_model, canvas)[0])
    result = dream.diffusion_generate(dream_model, PROMPT, max_new_tokens=6, steps=1)
    assert result.generated[0].tolist() == logits[0, 5:].argmax(-1).tolist()


def test_dream_commits_follow_the_float32_timestep_schedule(dream_model, monkeypatch):
    mask_id = dream_model.spec.mask_id
    seen = _inputs_seen(monkeypatch)
    result = dream.diffusion_generate(dream_model, PROMPT, max_new_tokens=10, steps=4)
    masks = [int((s == mask_id).sum()) for s in seen] + [int((result.sequence == mask_id).sum())]
    t = torch.linspace(1, 1e-3, 5)
    expected = [10]
    for i in range(4):
        left = expected[-1]
        expected.append(0 if i == 3 else left - int(torch.tensor(float(left)) * (1 - t[i + 1] / t[i])))
    assert masks == expected


def test_dream_left_padding_matches_the_unpadded_prompt(dream_model):
    pad = dream_model.spec.pad_id
    batch = torch.tensor([[pad, pad, 5, 6, 7], [9, 5, 6, 7, 8]])
    attention = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    both = dream.diffusion_generate(dream_model, batch, max_new_tokens=6, steps=3, attention_mask=attention)
    alone = dream.diffusion_generate(dream_model, torch.tensor([[5, 6, 7]]), max_new_tokens=6, steps=3)
    assert torch.equal(both.generated[:1], alone.generated)


# ------------------------------------------------------------------ naive transcriptions

@torch.no_grad()
def _naive_llada(model, prompt: list[int], steps: int, gen: int, block: int, temperature: float) -> list[int]:
    """LLaDA's published loop written out position by position (python lists, python sort;
    ties go to the lower index), sharing only the model forward with the reference."""
    mask_id = model.spec.mask_id
    seq = prompt + [mask_id] * gen
    per_block = steps // (gen // block)
    for b in range(gen // block):
        lo, hi = len(prompt) + b * block, len(prompt) + (b + 1) * block
        n = sum(t == mask_id for t in seq[lo:hi])
        for quota in [n // per_block + (i < n % per_block) for i in range(per_block)]:
            logits = dense_forward(model, torch.tensor([seq]))[0]
            score = logits
            if temperature:
                u = torch.rand(logits.shape, dtype=torch.float64)
                score = logits.double().exp() / (-u.log()) ** temperature
            probs = torch.softmax(logits, dim=-1)[0]
            guess = {p: int(score[0, p].argmax()) for p in range(lo, hi) if seq[p] == mask_id}
            conf = {p: float(probs[p, g]) for p, g in guess.items()}
            for p in sorted(conf, key=lambda p: (-conf[p], p))[:quota]:
                seq[p] = guess[p]
    return seq


def test_llada_matches_a_naive_transcription(llada_model):
    prompt = PROMPT[0].tolist()
    for steps, gen, block, temp in ((8, 8, 4, 0.0), (6, 12, 4, 0.0), (4, 8, 8, 0.0), (8, 8, 4, 1.0)):
        torch.manual_seed(11)
        ours = llada.generate(llada_model, PROMPT, steps=steps, gen_length=gen, block_length=block,
                              temperature=temp).sequence[0].tolist()
        torch.manual_seed(11)
        assert ours == _naive_llada(llada_model, prompt, steps, gen, block, temp)


@torch.no_grad()
def _naive_sdar(model, prompt: list[int], gen: int, block: int, steps: int, strategy: str,
                threshold: float) -> list[int]:
    """SDAR's greedy loop without any cache: each step reruns everything up to the end of the
    current block under a hand-built block-causal mask; selection in python."""
    mask_id = model.spec.mask_id
    total = -(-(len(prompt) + gen) // block) * block
    seq = prompt + [mask_id] * (total - len(prompt))
    quotas = [block // steps + (i < block % steps) for i in range(steps)]
    for start in range(len(prompt) // block * block, total, block):
        for quota in quotas:
            masked = [p for p in range(start, start + block) if seq[p] == mask_id]
            if not masked:
                break
            n = start + block
            allowed = torch.tensor([[k // block <= q // block for k in range(n)] for q in range(n)])
            logits = dense_forward(model, torch.tensor([seq[:n]]), torch.arange(n)[None], allowed[None])[0][0]
            probs = torch.softmax(logits, dim=-1)
            guess = {p: int(logits[p].argmax()) for p in masked}
            conf = {p: float(probs[p, g]) for p, g in guess.items()}
            if strategy == "sequential":
                chosen = masked[:quota]
            else:
                chosen = [p for p in masked if conf[p] > threshold]
                if strategy == "low_confidence_static" or len(chosen) < quota:
                    chosen = sorted(masked, key=lambda p: (-conf[p], p))[:quota]
            for p in chosen:
                seq[p] = guess[p]
    return seq


@pytest.mark.parametrize("strategy", sdar.STRATEGIES)
def test_sdar_matches_a_naive_transcription(sdar_model, strategy):
    for prompt, gen, steps, threshold in (([5, 6, 7, 8, 9], 9, 4, 0.02), ([5, 6, 7], 6, 2, 0.01),
                                          ([5, 6, 7, 8, 9, 10, 11, 12], 8, 4, 0.03)):
        ours = sdar.block_diffusion_generate(sdar_model, torch.tensor([prompt]), gen_length=gen, denoising_steps=steps,
                                             remasking_strategy=strategy, confidence_threshold=threshold)
        assert ours.sequence[0].tolist() == _naive_sdar(sdar_model, prompt, gen, 4, steps, strategy, threshold)


# ------------------------------------------------------------------ the CLI's mapping

def test_settings_validation_and_natural_algorithms():
    with pytest.raises(ValueError, match="max_tokens"):
        DecodeSettings(max_tokens=0)
    with pytest.raises(ValueError, match="threshold"):
        DecodeSettings(threshold=1.5)
    names = {f: natural_algorithm(make_tiny_model(f)[1]) for f in ("llada", "dream", "sdar", "llama")}
    assert names == {"llada": "llada", "dream": "dream", "sdar": "sdar", "llama": "ar"}


def test_decode_maps_settings_and_answer_ids_trims(llada_model):
    result = decode("fast-dllm-dual", llada_model, PROMPT, DecodeSettings(max_tokens=6, block_length=4))
    assert result.generated.shape[1] == 8  # rounded up to whole blocks
    spec = llada_model.spec
    row = torch.tensor([11, spec.mask_id, 12, spec.eos_ids[0], 13])
    assert answer_ids(row, spec, 5) == [11, 12]
    assert answer_ids(row, spec, 1) == [11]
    with pytest.raises(ValueError, match="threshold does not apply"):
        decode("llada", llada_model, PROMPT, DecodeSettings(threshold=0.5))
    with pytest.raises(ValueError, match="unknown algorithm"):
        decode("beam", llada_model, PROMPT, DecodeSettings())
    with pytest.raises(ValueError, match="causal LM"):
        decode("ar", llada_model, PROMPT, DecodeSettings())
