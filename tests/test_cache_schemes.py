"""Fast-dLLM's cache schemes in the engine, token for token (greedy, fp32, tiny random LLaDA).

At C = block the engine's ``dual-cache`` and ``prefix-cache`` modes equal the reference
``generate_with_dual_cache`` / ``generate_with_prefix_cache`` loops (reference/fast_dllm.py,
themselves checked against the published code's structure in test_reference.py) under the
top-k, threshold and factor rules: a batch of unequal prompts decoded together, and each
prompt alone. Chunks C < block on the dual cache, Dream's shifted logits, preemption and the
refresh budget are checked for what they promise.
"""

import pytest
import torch

from optimus.core.params import SamplingParams
from optimus.engine.llm import LLM
from optimus.models.dense import CacheMode
from optimus.reference import fast_dllm
from optimus.reference.adapter import ModelCall
from fixtures.engine import tiny_loaded

PROMPTS = [[5, 9, 13], [3] * 11, list(range(20, 37)), [7]]
BLOCK, GEN = 8, 16

RULES = {
    "topk": (SamplingParams(max_tokens=GEN, rule="topk", tokens_per_step=2, ignore_eos=True),
             dict(steps=GEN // 2)),
    "threshold": (SamplingParams(max_tokens=GEN, rule="threshold", threshold=0.15, ignore_eos=True),
                  dict(steps=GEN, threshold=0.15)),
    "factor": (SamplingParams(max_tokens=GEN, rule="factor", factor=1.0, ignore_eos=True),
               dict(steps=GEN, factor=1.0)),
}
REFERENCES = {"dual-cache": fast_dllm.generate_with_dual_cache, "prefix-cache": fast_dllm.generate_with_prefix_cache}


@pytest.fixture(scope="module")
def llada():
    return tiny_loaded("llada")


def _engine(loaded, mode, policy=f"fixed:{BLOCK}", **opts):
    opts = {"num_pages": 512, "page_size": 4, **opts}
    return LLM(loaded=loaded, policy=policy, device="cpu", block_size=BLOCK, cache_mode=mode, **opts)


def _answers(llm, prompts, params):
    return [list(o.token_ids) for o in llm.generate(prompts, [params] * len(prompts))]


def _reference(loaded, mode, prompt, kwargs):
    out = REFERENCES[mode](loaded.model, [prompt], gen_length=GEN, block_length=BLOCK, **kwargs)
    return out.generated[0].tolist()


@pytest.mark.parametrize("mode", ["dual-cache", "prefix-cache"])
@pytest.mark.parametrize("rule", list(RULES))
def test_full_chunk_equals_fast_dllm_reference(llada, mode, rule):
    params, kwargs = RULES[rule]
    want = [_reference(llada, mode, p, kwargs) for p in PROMPTS]
    llm = _engine(llada, mode)
    assert _answers(llm, PROMPTS, params) == want  # unequal prompts in one batch
    assert [_answers(llm, [p], params)[0] for p in PROMPTS] == want  # one by one


def test_modes_differ_from_each_other(llada):
    """The three modes are different computations: a test that cannot tell them apart would
    pass with the wrong one."""
    params = RULES["threshold"][0]
    got = {m: _answers(_engine(llada, m), PROMPTS, params) for m in ("dual-cache", "prefix-cache", "prefix-block")}
    assert got["dual-cache"] != got["prefix-block"]
    assert got["prefix-cache"] != got["prefix-block"]


def test_dual_cache_steps_run_only_the_window_after_the_refresh(llada):
    """Forward rows per request: one whole-sequence refresh per block, then the block alone."""
    llm = _engine(llada, "dual-cache")
    rows = []
    real = llm.engine.runner.forward

    def counting(batch):
        rows.append(batch.input_ids.numel())
        return real(batch)

    llm.engine.runner.forward = counting
    prompt = PROMPTS[1]
    _answers(llm, [prompt], SamplingParams(max_tokens=GEN, rule="topk", tokens_per_step=2, ignore_eos=True))
    total = len(prompt) + GEN
    assert rows.count(total) == GEN // BLOCK  # one refresh per block
    assert set(rows) == {total, BLOCK}  # every other step: the block's rows only
    assert len(rows) == GEN // 2  # top-k 2: BLOCK / 2 steps per block, the refresh among them


@pytest.mark.parametrize("chunk", [2, 4])
def test_dual_cache_chunks_commit_inside_their_window(llada, chunk):
    llm = _engine(llada, "dual-cache", policy=f"fixed:{chunk}")
    outs = llm.generate(PROMPTS, [SamplingParams(max_tokens=GEN, threshold=0.15, ignore_eos=True)] * len(PROMPTS))
    for out in outs:
        assert len(out.token_ids) == GEN and llada.spec.mask_id not in out.token_ids
        assert max(out.stats.chunk_history) <= chunk


def test_dual_cache_chunk_equal_to_block_is_the_full_chunk(llada):
    params = RULES["threshold"][0]
    assert _answers(_engine(llada, "dual-cache", policy=f"fixed:{BLOCK}"), PROMPTS, params) == \
        _answers(_engine(llada, "dual-cache", policy="fixed:64"), PROMPTS, params)


def _dual_cache_shifted(model, prompt, gen, block, threshold):
    """Dual cache for a model whose row i predicts position i + 1 (Dream): a block [lo, hi)
    reads rows [lo - 1, hi - 1); the refresh is a full forward; later steps recompute those
    rows, replacing their cache slots."""
    call = ModelCall(model)
    mask_id = call.mask_id(None)
    p = len(prompt)
    x = torch.tensor([prompt + [mask_id] * gen])
    for lo in range(p, p + gen, block):
        hi = lo + block
        logits, cache = call(x, 0, None, CacheMode.APPEND)
        rows = logits[:, lo - 1:hi - 1]
        while True:
            probs = torch.softmax(rows[0].float(), -1)
            conf, tok = probs.max(-1)
            masked = x[0, lo:hi] == mask_id
            conf = torch.where(masked, conf, torch.full_like(conf, -torch.inf))
            pick = conf >= threshold
            pick[conf.argmax()] = True
            x[0, lo:hi] = torch.where(pick & masked, tok, x[0, lo:hi])
            if not (x[0, lo:hi] == mask_id).any():
                break
            rows, cache = call(x[:, lo - 1:hi - 1], lo - 1, cache, CacheMode.REPLACE)
    return x[0, p:].tolist()


def test_dream_dual_cache_reads_shifted_rows():
    loaded = tiny_loaded("dream")
    params = SamplingParams(max_tokens=GEN, threshold=0.15, ignore_eos=True)
    got = _answers(_engine(loaded, "dual-cache"), PROMPTS, params)
    assert got == [_dual_cache_shifted(loaded.model, p, GEN, BLOCK, 0.15) for p in PROMPTS]


def test_preempted_dual_cache_request_finishes(llada):
    """Pages for two whole sequences only: requests preempt each other and still finish."""
    llm = _engine(llada, "dual-cache", num_pages=12, policy="fixed:2")
    outs = llm.generate(PROMPTS, [SamplingParams(max_tokens=GEN, threshold=0.15, ignore_eos=True)] * len(PROMPTS))
    assert all(len(o.token_ids) == GEN and llada.spec.mask_id not in o.token_ids for o in outs)


def test_refresh_must_fit_the_step_budget(llada):
    llm = _engine(llada, "dual-cache", max_tokens_per_step=16)
    with pytest.raises(ValueError, match="max-tokens-per-step"):
        llm.generate([PROMPTS[2]], SamplingParams(max_tokens=GEN))


def test_cache_mode_is_checked(llada):
    with pytest.raises(ValueError, match="cache_mode"):
        _engine(llada, "everything")
    with pytest.raises(ValueError, match="full-attention"):
        _engine(tiny_loaded("sdar"), "dual-cache")


class _Recording:
    """A fixed chunk policy that keeps every view and feedback it is given."""

    def __init__(self, chunk: int) -> None:
        self.name, self.chunk, self.views, self.feedback = f"fixed:{chunk}", chunk, [], []

    def choose(self, view):
        self.views.append(view)
        return [min(self.chunk, r.max_chunk) for r in view.requests]

    def observe(self, feedback) -> None:
        self.feedback.append(feedback)


@pytest.mark.parametrize("mode", ["dual-cache", "prefix-block"])
def test_policy_sees_the_refresh_rows_ahead_and_in_feedback(llada, mode):
    """A scheme that refreshes tells the policy what one refresh recomputes (prompt + canvas)
    before any step runs, and each step reports the refresh rows it ran beyond the windows."""
    llm, policy = _engine(llada, mode), _Recording(4)
    llm.engine.use_policy(policy)
    prompt = PROMPTS[1]
    _answers(llm, [prompt], SamplingParams(max_tokens=GEN, rule="topk", tokens_per_step=2, ignore_eos=True))
    total = len(prompt) + GEN
    refreshing = mode == "dual-cache"
    assert policy.views and {v.refresh_rows for v in policy.views} == {float(total) if refreshing else 0.0}
    # one refresh per block, each over the whole sequence but its 4-position window
    assert sum(fb.refresh_rows for fb in policy.feedback) == (GEN // BLOCK * (total - 4) if refreshing else 0)
