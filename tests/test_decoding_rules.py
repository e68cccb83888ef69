"""The engine's commit rules are Fast-dLLM's (llada/generate.py: ``get_transfer_index`` with a
threshold, ``get_transfer_index_dynamic`` for the factor rule), and the engine and the reference
decoders share one implementation of each."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from optimus.core.params import SamplingParams
from optimus.decoding.replay import Acceptance, ReplayAcceptance, _by_window_most_confident_first
from optimus.decoding.rules import (RowDraws, _filter, factor_count, keep_many, params_rule, propose, select_commits,
                                    threshold_mask)
from optimus.reference.rules import Factor, Threshold


def _engine(conf: list[float], **params) -> list[int]:
    return sorted(select_commits(torch.tensor(conf), SamplingParams(**params)).tolist())


def _reference(rule, conf: list[float]) -> list[int]:
    c = torch.tensor([conf])
    picked = rule.select(c, torch.ones_like(c, dtype=torch.bool), 0)[0]
    return torch.nonzero(picked).flatten().tolist()


def _fast_dllm_factor_count(conf: list[float], factor: float) -> int:
    """Fast-dLLM's scan, written out: bars 1 - f/(n+1) for n = 1.. with the first set to -1;
    stop at the first candidate below its bar; a stop at the first or last index counts it."""
    ranked = sorted(conf, reverse=True)
    bars = [-1.0] + [1 - factor / (n + 1) for n in range(2, len(ranked) + 1)]
    top_i = 0
    for top_i in range(len(bars)):
        if ranked[top_i] < bars[top_i]:
            break
    return top_i + 1 if top_i in (0, len(bars) - 1) else top_i


def test_factor_first_failure_at_the_last_candidate_commits_everything():
    # bars -1, 2/3: 0.638 fails at the last index, and Fast-dLLM's scan counts it anyway
    assert _engine([0.922, 0.638], rule="factor", factor=1.0) == [0, 1]
    assert _reference(Factor(1.0), [0.922, 0.638]) == [0, 1]


def test_factor_confidence_equal_to_the_bar_passes():
    # bars -1, 0.5, 2/3 at factor 1.5 (exact in binary: 0.5 == 1 - 1.5/3): 0.5 is not below -> passes
    conf = [0.9, 0.5, 0.1, 0.05]  # bars -1, 0.5, 0.625, 0.7: fails at index 2 (not last) -> 2
    assert factor_count(torch.tensor(conf), 1.5) == 2
    assert _engine(conf, rule="factor", factor=1.5) == [0, 1]
    assert _reference(Factor(1.5), conf) == [0, 1]


@pytest.mark.parametrize("conf,factor,expected", [
    ([0.3], 1.0, 1),                      # one candidate always commits
    ([0.01, 0.02, 0.03], 1.0, 1),         # second fails (not last): only the first
    ([0.99, 0.98, 0.97, 0.96], 1.0, 4),   # nothing fails
    ([0.9, 0.8, 0.5, 0.1], 1.0, 2),       # third of four fails
    ([0.9, 0.8, 0.1], 1.0, 3),            # last fails: quirk, all commit
])
def test_factor_counts_match_fast_dllm(conf, factor, expected):
    assert _fast_dllm_factor_count(conf, factor) == expected
    assert factor_count(torch.tensor(conf), factor) == expected
    assert len(_engine(conf, rule="factor", factor=factor)) == expected
    assert len(_reference(Factor(factor), conf)) == expected


def test_factor_engine_equals_reference_and_fast_dllm_on_random_confidences():
    gen = torch.Generator().manual_seed(0)
    for trial in range(500):
        n = int(torch.randint(1, 12, (1,), generator=gen))
        conf = (1 - torch.rand(n, generator=gen) ** 3).tolist()
        factor = [0.5, 1.0, 2.0, 4.0][trial % 4]
        want = _fast_dllm_factor_count(torch.tensor(conf).tolist(), factor)
        engine = _engine(conf, rule="factor", factor=factor)
        assert len(engine) == want, (conf, factor)
        assert engine == _reference(Factor(factor), conf)
        assert engine == sorted(torch.topk(torch.tensor(conf), want).indices.tolist())


def test_threshold_confidence_equal_to_the_threshold_commits():
    # Fast-dLLM drops a candidate only when confidence < threshold: equality commits
    conf = [0.5, 0.75, 0.25]
    assert _engine(conf, rule="threshold", threshold=0.5) == [0, 1]
    assert _reference(Threshold(0.5), conf) == [0, 1]
    assert threshold_mask(torch.tensor(conf), 0.5).tolist() == [True, True, False]


@pytest.mark.parametrize("conf,threshold,expected", [
    ([0.2, 0.3, 0.1], 0.9, [1]),              # none pass: the most confident still commits
    ([0.95, 0.3, 0.92, 0.9], 0.9, [0, 2, 3]),
    ([0.4, 0.4, 0.1], 0.9, [0]),              # equal maxima: the first (argmax)
    ([1.0, 1.0], 1.0, [0, 1]),
])
def test_threshold_engine_equals_reference(conf, threshold, expected):
    assert _engine(conf, rule="threshold", threshold=threshold) == expected
    assert _reference(Threshold(threshold), conf) == expected


# ---- sampling: one vectorised draw for every sampled row --------------------------------

def _draws(n: int, temperature=1.0, top_k=0, top_p=1.0, seed=7, position=None, draw=0) -> RowDraws:
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    positions = range(n) if position is None else [position] * n
    return RowDraws.of([(params, q, draw) for q in positions], "cpu")


def test_sampled_rows_follow_the_softmax_of_the_scaled_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    counts = torch.zeros(4)
    for d in range(4000):  # the draw counter changes the noise, as for a re-proposed position
        tokens, _ = propose(logits, _draws(1, temperature=0.7, draw=d))
        counts[tokens] += 1
    expected = torch.softmax(logits[0] / 0.7, dim=-1)
    assert torch.allclose(counts / counts.sum(), expected, atol=0.025), (counts / counts.sum(), expected)


def test_a_row_draws_the_same_token_alone_and_in_any_batch():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    batch = RowDraws.of([(SamplingParams(temperature=1.0, seed=s), q, 0) for s, q in
                         [(1, 10), (2, 10), (3, 11), (1, 12), (9, 4), (1, 10)]], "cpu")
    together, _ = propose(logits, batch)
    for i in range(6):
        one = RowDraws.of([(SamplingParams(temperature=1.0, seed=int(batch.seed[i])), int(batch.position[i]), 0)],
                          "cpu")
        assert propose(logits[i:i + 1], one)[0].item() == together[i].item()
    assert len(set(propose(logits[:1].expand(8, -1), _draws(8))[0].tolist())) > 1  # positions differ -> noise differs


def test_top_k_and_top_p_bound_the_support_and_greedy_rows_take_the_argmax():
    logits = torch.randn(200, 30, generator=torch.Generator().manual_seed(1))
    top2 = logits.topk(2, dim=-1).indices
    tokens, _ = propose(logits, _draws(200, top_k=2))
    assert (tokens[:, None] == top2).any(dim=-1).all()
    assert torch.equal(propose(logits, _draws(200, top_p=1e-6))[0], logits.argmax(-1))
    mixed = RowDraws.of([(SamplingParams(temperature=t, seed=3), q, 0) for q, t in enumerate([0.0, 1.0] * 100)], "cpu")
    tokens, conf = propose(logits, mixed)
    assert torch.equal(tokens[::2], logits[::2].argmax(-1))
    probs = torch.softmax(logits, dim=-1)  # temperature 1 and greedy rows: the plain softmax
    assert torch.allclose(conf, probs.gather(-1, tokens[:, None]).squeeze(-1))


def _windows(rng: random.Random, count: int):
    """Random windows: lengths 1-12, confidences with ties (values on a coarse grid) and
    exact threshold hits, every rule with random settings."""
    lens, confs, params = [], [], []
    for _ in range(count):
        n = rng.randint(1, 12)
        lens.append(n)
        confs += [rng.choice([0.1, 0.5, 0.9, 0.95, 1.0, rng.random()]) for _ in range(n)]
        rule = rng.choice(["threshold", "threshold", "topk", "factor"])
        params.append(SamplingParams(rule=rule, threshold=rng.choice([0.5, 0.9, 0.95]),
                                     tokens_per_step=rng.randint(1, 4), factor=rng.choice([0.5, 1.0, 2.0])))
    return np.array(lens, np.int64), np.array(confs, np.float32), params


def _one_by_one(rule, lens, conf, params, chunks) -> np.ndarray:
    keep, a = np.zeros(conf.size, bool), 0
    for n, p, c in zip(lens.tolist(), params, chunks):
        chosen = [0] if n == 1 else rule(torch.from_numpy(conf[a:a + n]), p, c).tolist()
        keep[[a + i for i in chosen]] = True
        a += n
    return keep


def test_many_windows_at_once_commit_what_the_rule_commits_window_by_window():
    rng = random.Random(0)
    for _ in range(200):
        lens, conf, params = _windows(rng, rng.randint(1, 40))
        chunks = [int(n) for n in lens]
        assert (keep_many(params_rule, conf, lens, params, chunks)
                == _one_by_one(params_rule, lens, conf, params, chunks)).all()


def test_many_windows_fall_back_to_the_rule_on_non_finite_confidences():
    lens = np.array([3, 2], np.int64)
    conf = np.array([0.2, np.nan, 0.95, 0.3, 0.99], np.float32)
    params = [SamplingParams(threshold=0.9)] * 2
    assert (keep_many(params_rule, conf, lens, params, [3, 2])
            == _one_by_one(params_rule, lens, conf, params, [3, 2])).all()


def test_a_replayed_acceptance_draws_and_commits_alike_at_once_and_window_by_window():
    acceptance = Acceptance({4: [1, 2, 3], 8: [1, 2, 5]}, {4: {4: [1, 2, 3], 2: [1, 2]}, 8: {8: [2, 5], 3: [1, 3]}})
    rng = random.Random(1)
    for seed in range(20):
        lens = np.array([rng.randint(1, 8) for _ in range(30)], np.int64)
        conf = np.array(rng.sample(range(10_000), int(lens.sum())), np.float32) / 10_000  # no ties
        chunks = [rng.choice([4, 8]) for _ in lens]
        params = [SamplingParams()] * lens.size
        at_once = keep_many(ReplayAcceptance(acceptance, seed=seed), conf, lens, params, chunks)
        assert (at_once == _one_by_one(ReplayAcceptance(acceptance, seed=seed), lens, conf, params, chunks)).all()


def test_a_replayed_acceptance_orders_rows_as_a_two_key_sort_would():
    """Ties (the earlier row first), zeros, -0.0 and denormals through the bit-pattern key;
    negatives and NaN through the general sort."""
    rng = np.random.default_rng(2)
    for trial in range(100):
        lens = rng.integers(1, 33, rng.integers(1, 40))
        conf = rng.random(int(lens.sum())).astype(np.float32)
        for value, share in ((0.5, 0.2), (0.0, 0.05), (-0.0, 0.05), (1e-40, 0.05)):
            conf[rng.random(conf.size) < share] = value
        if trial % 10 == 0:
            conf[0] = np.nan if trial % 20 else -0.25
        window = np.repeat(np.arange(lens.size), lens)
        assert (_by_window_most_confident_first(conf, window) == np.lexsort((-conf, window))).all()


def test_a_top_p_1_row_keeps_its_whole_support_in_a_batch_with_filtering_rows():
    """In fp32 the cumulative probability of a wide row passes 1.0 before its end: a row
    without top-p must not lose that tail when a neighbour's top-p makes the batch filter."""
    logits = torch.randn(2, 50_000, generator=torch.Generator().manual_seed(0)) * 3
    ordered = torch.softmax(logits[0].sort(descending=True).values, -1)
    assert (ordered.cumsum(-1) - ordered > 1.0).any()  # the rounding this is about happens here
    alone = RowDraws.of([(SamplingParams(temperature=1.0, seed=1), 0, 0)], "cpu")
    batch = RowDraws.of([(SamplingParams(temperature=1.0, seed=1), 0, 0),
                         (SamplingParams(temperature=1.0, seed=2, top_p=0.5), 1, 0)], "cpu")
    assert torch.equal(_filter(logits[:1], alone), logits[:1])
    assert torch.equal(_filter(logits, batch)[0], logits[0])
    assert torch.isinf(_filter(logits, batch)[1]).any()  # the neighbour's nucleus still applies
    top_k_only = RowDraws.of([(SamplingParams(temperature=1.0, seed=1, top_k=40_000), 0, 0)] * 2, "cpu")
    assert int(torch.isfinite(_filter(logits, top_k_only)[0]).sum()) == 40_000
