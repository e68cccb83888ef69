"""Likelihoods on tiny random models (decoding/likelihood.py through engine/scoring.py): exact
causal log-probs, the block-diffusion ELBO and LLaDA's Monte Carlo estimate (reproducible, <= 0,
the one-masked-token identity, variance falling with samples), and batching that changes nothing."""

from __future__ import annotations

import statistics

import pytest
import torch

from optimus.core.scoring import ScoreRequest
from optimus.decoding import likelihood as lk
from optimus.engine.scoring import score_now
from optimus.reference.adapter import ModelCall

TOKENS = (5, 17, 33, 44, 90, 100, 7, 8, 9, 10, 11, 12, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49)


def _score(model, spec, sequences, ctxs, *, samples=8, seed=0, top_n=0, budget=4096, block=None, chained=()):
    request = ScoreRequest(tuple(map(tuple, sequences)), tuple(ctxs), top_n=top_n, seed=seed, chained=chained)
    return score_now(request, model, spec, samples=samples, budget=budget, block=block)


@torch.no_grad()
def _causal_reference(model, tokens) -> torch.Tensor:
    """[L, V] fp32 log-softmax; row i predicts token i + 1."""
    logits, _ = ModelCall(model)(torch.tensor([tokens]))
    return logits[0].float().log_softmax(-1)


def test_causal_scores_are_the_models_log_softmax(tiny_model):
    model, spec = tiny_model("llama")
    ref = _causal_reference(model, list(TOKENS))
    result = _score(model, spec, [TOKENS, TOKENS[:9]], [1, 4], top_n=5)
    assert result.method == "exact" and result.samples == 1
    full, part = result.sequences
    want = torch.tensor([ref[i - 1, TOKENS[i]] for i in range(1, len(TOKENS))])
    assert torch.allclose(torch.tensor(full.logprobs), want, atol=1e-4)
    assert part.logprobs == pytest.approx(full.logprobs[3:8], abs=1e-5)  # the context only conditions
    for k, (ids, vals) in enumerate(zip(full.top_ids, full.top_logprobs)):
        top = ref[k].topk(5)
        assert list(ids) == top.indices.tolist()
        assert torch.allclose(torch.tensor(vals), top.values, atol=1e-4)


@pytest.mark.parametrize("family", ["sdar", "llada", "dream"])
def test_estimates_are_reproducible_and_never_positive(tiny_model, family):
    model, spec = tiny_model(family)
    a = _score(model, spec, [TOKENS], [5], seed=3)
    b = _score(model, spec, [TOKENS], [5], seed=3)
    c = _score(model, spec, [TOKENS], [5], seed=4)
    assert a == b
    assert a.sequences[0].logprobs != c.sequences[0].logprobs
    assert a.method == ("block_elbo" if family == "sdar" else "mc") and a.samples == 8
    assert all(v <= 0 for v in a.sequences[0].logprobs) and sum(a.sequences[0].logprobs) < 0


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_one_masked_token_equals_the_exact_masked_log_prob(tiny_model, family):
    """One scored token: every sample masks it with weight L/l = 1, so the estimate is the
    model's log-prob of the token at a masked position, whatever the seed or sample count."""
    model, spec = tiny_model(family)
    masked = torch.tensor([TOKENS[:-1] + (spec.mask_id,)])
    with torch.no_grad():
        logits, _ = ModelCall(model)(masked)
    row = len(TOKENS) - (2 if spec.logit_shift else 1)  # Dream reads token i from row i - 1
    exact = logits[0, row].float().log_softmax(-1)[TOKENS[-1]].item()
    for seed, samples in ((0, 1), (7, 5)):
        result = _score(model, spec, [TOKENS], [len(TOKENS) - 1], samples=samples, seed=seed)
        assert result.sequences[0].logprobs == pytest.approx((exact,), abs=1e-5)


@pytest.mark.parametrize("family", ["sdar", "llada"])
def test_more_samples_reduce_the_variance(tiny_model, family):
    model, spec = tiny_model(family)

    def spread(samples: int) -> float:
        totals = [sum(_score(model, spec, [TOKENS], [4], samples=samples, seed=s, block=8).sequences[0].logprobs)
                  for s in range(12)]
        return statistics.variance(totals)

    few, many = spread(2), spread(16)
    assert many < few / 3, (few, many)  # independent samples would give few / 8


def test_block_elbo_rows_see_clean_earlier_blocks_and_their_own_noised_block(tiny_model):
    """Each noised block of a row scores as the model run on the clean blocks before it plus
    that noised block alone (block-causal), so one row equals a forward per block."""
    model, spec = tiny_model("sdar")
    block, ctx, samples = 8, 5, 3
    rows = lk.rows_for(spec, 0, list(TOKENS), ctx, samples, seed=11, block=block)
    expected = torch.zeros(len(TOKENS) - ctx, dtype=torch.float64)
    call = ModelCall(model, block_size=block)
    for row in rows:
        noisy = row.groups > 0
        noised = row.ids[noisy]
        start = int(row.positions[noisy][0])
        for lo in range(start, len(TOKENS), block):
            piece = torch.cat([torch.tensor(TOKENS[:lo], dtype=torch.long), noised[lo - start:lo - start + block]])
            with torch.no_grad():
                logp = call(piece[None])[0][0].float().log_softmax(-1)
            for read, slot, weight, target in zip(row.reads, row.slots, row.weights, row.targets):
                pos = int(row.positions[read])
                if lo <= pos < lo + block:
                    expected[slot] += weight * logp[pos, target].item() / samples
    got = _score(model, spec, [TOKENS], [ctx], samples=samples, seed=11, block=block).sequences[0].logprobs
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), expected, atol=1e-5)


@pytest.mark.parametrize("family", ["sdar", "llada", "dream"])
def test_a_chained_token_is_its_one_token_continuation(tiny_model, family):
    """Chained: token i gets the estimate of ``tokens[:i+1]`` with context i (exact, whatever
    the seed), so sums over any span are chain-rule sums; the block-causal rows that share one
    clean prefix among a block's tokens give the same values."""
    model, spec = tiny_model(family)
    ctx = 3
    chained = _score(model, spec, [TOKENS], [ctx], chained=(True,), block=8, top_n=2, seed=1).sequences[0]
    singles = [TOKENS[:i + 1] for i in range(ctx, len(TOKENS))]
    one_by_one = _score(model, spec, singles, [i for i in range(ctx, len(TOKENS))], block=8, top_n=2, seed=9)
    assert chained.logprobs == pytest.approx([s.logprobs[0] for s in one_by_one.sequences], abs=1e-5)
    assert chained.top_ids == tuple(s.top_ids[0] for s in one_by_one.sequences)
    tight = _score(model, spec, [TOKENS], [ctx], chained=(True,), block=8, budget=len(TOKENS)).sequences[0]
    assert tight.logprobs == pytest.approx(chained.logprobs, abs=1e-5)  # a block's groups over several rows


@pytest.mark.parametrize("family", ["llama", "sdar", "llada", "dream"])
def test_batching_and_the_token_budget_change_nothing(tiny_model, family):
    """A sequence scores the same alone, padded in a batch with others, or one row per forward."""
    model, spec = tiny_model(family)
    others = [TOKENS[:7], TOKENS[3:], TOKENS[:13]]
    alone = _score(model, spec, [TOKENS], [3], top_n=2, block=8).sequences[0]
    batched = _score(model, spec, [*others, TOKENS], [2, 1, 6, 3], top_n=2, block=8,
                     chained=(True, False, True, False)).sequences[-1]
    small = _score(model, spec, [TOKENS], [3], top_n=2, block=8, budget=2 * len(TOKENS)).sequences[0]
    for got in (batched, small):
        assert got.logprobs == pytest.approx(alone.logprobs, abs=1e-5)
        assert got.top_ids == alone.top_ids


def test_alternatives_share_the_scale_of_the_scored_token(tiny_model):
    """Diffusion top-N values are the same weighted shares as the token's own value: where the
    token is the best alternative, its value is the top value."""
    model, spec = tiny_model("llada")
    scores = _score(model, spec, [TOKENS], [2], samples=6, top_n=3).sequences[0]
    for token, value, ids, vals in zip(TOKENS[2:], scores.logprobs, scores.top_ids, scores.top_logprobs):
        if not ids:  # never masked in any sample: no share, no alternatives
            assert value == 0.0
            continue
        assert max(vals) >= value - 1e-6
        if token in ids:
            assert vals[ids.index(token)] == pytest.approx(value, abs=1e-5)
