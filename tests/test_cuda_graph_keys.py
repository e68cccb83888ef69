"""CUDA-graph buckets (CPU-checkable part): the keys pre-captured at start-up cover every
decoding step the engine actually runs, whatever the policy and however requests come and go."""

import itertools
import random

import pytest
import torch

from optimus.executor.cuda_graphs import GraphedBody, decode_keys, step_key
from optimus.executor.runner import StepBatch
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


def _graphed_body(capture_prompt_steps: bool):
    llm = LLM(loaded=tiny_loaded("sdar"), policy="fixed:8", device="cpu", num_pages=64, page_size=4,
              block_size=BLOCK, max_running=MAX_RUNNING)
    engine = llm.engine
    return GraphedBody(engine.runner.model, engine.storage, "torch", MAX_TOKENS, MAX_RUNNING, max_pages=16,
                       capture_prompt_steps=capture_prompt_steps)


def _batch(rows_per_request: list[int], carries_prompt: bool = False):
    t, r = sum(rows_per_request), len(rows_per_request)
    cu = torch.tensor([0, *itertools.accumulate(rows_per_request)], dtype=torch.int32)
    return StepBatch(torch.zeros(t, dtype=torch.long), torch.zeros(t, dtype=torch.long),
                     torch.zeros(t, dtype=torch.int32), torch.full((t,), -1), cu,
                     torch.zeros(r, dtype=torch.int32), torch.zeros((r, 4), dtype=torch.int32),
                     torch.zeros(0, dtype=torch.long), max_q_len=max(rows_per_request), carries_prompt=carries_prompt)


def test_steps_carrying_a_prompt_capture_nothing():
    """By default a step with a prompt piece replays only a bucket already captured (else it
    runs eagerly): arrivals mixing prompts into decoding steps cannot stall the loop on
    captures. Decoding steps (refreshes included) capture any bucket that fits."""
    body = _graphed_body(capture_prompt_steps=False)
    decode, prompt = _batch([20, 1, 3]), _batch([20, 1, 3], carries_prompt=True)
    too_big = _batch([MAX_TOKENS - 2, 3])
    assert body.fits(decode) and not body.fits(prompt) and not body.fits(too_big)
    body.graphs[body.key(prompt)] = None  # as if captured before: a known bucket replays
    assert body.fits(prompt)
    anything = _graphed_body(capture_prompt_steps=True)
    assert anything.fits(prompt) and not anything.fits(too_big)


@pytest.mark.parametrize("family,cache_mode,prefills", [("sdar", "auto", True), ("llada", "prefix-cache", False),
                                                        ("llada", "dual-cache", False)])
def test_only_prefill_steps_carry_a_prompt(family, cache_mode, prefills):
    """A block-causal model prefills its prompt in steps of their own kind; a full-attention
    model's cache schemes compute the prompt in block-start refreshes, which are decoding
    steps (their buckets recur with the sequence length, and capture)."""
    llm = LLM(loaded=tiny_loaded(family), policy="fixed:4", device="cpu", num_pages=256, page_size=4,
              block_size=BLOCK, max_running=MAX_RUNNING, cache_mode=cache_mode)
    carried, run = [], llm.engine.runner.run

    def recording_run(plan, *args, **kwargs):
        carried.append(plan.carries_prompt)
        return run(plan, *args, **kwargs)

    llm.engine.runner.run = recording_run
    llm.generate([list(range(5, 25))], SamplingParams(max_tokens=12, ignore_eos=True))
    assert len(carried) > 3 and not any(carried[1:])
    assert carried[0] is prefills
