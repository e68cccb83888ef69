"""CUDA-graph buckets (CPU-checkable part): the keys pre-captured at start-up cover every
decoding step the engine actually runs, whatever the policy and however requests come and go."""

import random

import pytest

from optimus.executor.cuda_graphs import decode_keys, step_key
from optimus.engine.llm import LLM
from optimus.core.params import SamplingParams
from fixtures.engine import tiny_loaded

MAX_TOKENS, MAX_RUNNING, BLOCK = 64, 6, 8


def _decode_step_keys(family: str, policy: str) -> list[tuple[int, int, int]]:
    llm = LLM(loaded=tiny_loaded(family), policy=policy, device="cpu", num_pages=256, page_size=4,
              block_size=BLOCK, max_running=MAX_RUNNING)
    runner, seen = llm.engine.runner, []
    build = runner.build

    def recording_build(plan, feed=None):
        batch, wants = build(plan, feed)
        # Steps holding a whole-sequence cache refresh are sized by the prompt: their graphs are
        # captured on first use, not pre-captured.
        graphed = all(w.window is not None and not w.refresh for w in plan.works)
        if graphed and batch.input_ids.numel() <= MAX_TOKENS:
            seen.append(step_key(batch.input_ids.numel(), batch.cu_q.numel() - 1, batch.max_q_len))
        return batch, wants

    runner.build = recording_build
    rng = random.Random(3)
    prompts = [[rng.randrange(1, 200) for _ in range(rng.randint(1, 12))] for _ in range(14)]
    params = [SamplingParams(max_tokens=rng.randint(1, 40), ignore_eos=True) for _ in prompts]
    llm.generate(prompts, params)
    return seen


@pytest.mark.parametrize("family,policy", [("sdar", "fixed:8"), ("llada", "elastic"), ("sdar", "fixed:3"),
                                           ("llama", "ar"), ("dream", "ar")])
def test_decode_keys_cover_every_decoding_step(family, policy):
    causal = family == "llama"
    keys = set(decode_keys(MAX_TOKENS, MAX_RUNNING, 1 if causal else 2 * BLOCK))
    seen = _decode_step_keys(family, policy)
    assert len(seen) > 10
    assert set(seen) <= keys, sorted(set(seen) - keys)


def test_decode_keys_are_exactly_the_reachable_buckets():
    """Brute force over every (rows, requests, longest request) a step can have."""
    reachable = {step_key(t, r, q) for t in range(1, 65) for r in range(1, 7) for q in range(1, 17)
                 if r + q - 1 <= t <= r * q}
    keys = decode_keys(64, 6, 16)
    assert set(keys) == reachable and len(keys) == len(reachable)
    assert keys == sorted(keys, reverse=True)  # largest first: the shared pool is sized once
