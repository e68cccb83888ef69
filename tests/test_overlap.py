"""Overlapped causal decoding (``runner.overlap``): a step is launched before the previous
step's tokens are read, its input token fed on the device. Token for token it must equal the
synchronous engine, whatever ends requests, joins them or mixes sampling in."""

import random

import pytest

from optimus.engine.llm import LLM
from optimus.core.params import SamplingParams
from fixtures.engine import tiny_loaded

OPTIONS = dict(policy="ar", device="cpu", num_pages=256, page_size=4)


@pytest.fixture(scope="module")
def llama():
    return tiny_loaded("llama")


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 200) for _ in range(rng.randint(1, 9))] for _ in range(n)]


def _generate(loaded, overlap: bool, prompts, params) -> list[tuple[tuple[int, ...], str]]:
    llm = LLM(loaded=loaded, overlap=overlap, **OPTIONS)
    return [(o.token_ids, o.finish_reason) for o in llm.generate(prompts, params)]


def test_overlap_equals_synchronous_decoding_with_stops_lengths_and_sampling(llama):
    prompts = _prompts(6)
    free = _generate(llama, False, prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    # Stop ids taken from the answers, so requests really end early, at different steps.
    params = [SamplingParams(max_tokens=12, stop_token_ids=(free[0][0][4],), ignore_eos=True),
              SamplingParams(max_tokens=1, ignore_eos=True),
              SamplingParams(max_tokens=12, stop_token_ids=(free[2][0][0],), ignore_eos=True),
              SamplingParams(max_tokens=7, temperature=0.9, seed=5, ignore_eos=True),  # sampled
              SamplingParams(max_tokens=9, min_tokens=3, stop_token_ids=(free[4][0][1],)),  # constrained
              SamplingParams(max_tokens=12, ignore_eos=True)]
    sync = _generate(llama, False, prompts, params)
    assert [reason for _, reason in sync] == ["stop", "length", "stop", "length", "stop", "length"]
    assert _generate(llama, True, prompts, params) == sync


def test_overlap_keeps_one_step_in_flight_and_reports_it_a_step_late(llama):
    llm = LLM(loaded=llama, overlap=True, **OPTIONS)
    engine = llm.engine
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()  # prefill (no logits): nothing to wait for, assumed at once
    assert engine._in_flight is not None
    seen, in_flight_after = [], []
    while engine.has_work():
        outputs = engine.step()
        seen += [o.token_ids for o in outputs]
        in_flight_after.append(engine._in_flight is not None)
    # Four decoding steps, each read one step later; the last is read by a step with no work.
    assert [len(ids) for ids in seen] == [1, 2, 3, 4]
    assert in_flight_after == [True, True, True, True, False]
    reference = _generate(llama, False, [[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert (seen[-1], outputs[-1].finish_reason) == reference[0]


def test_requests_joining_mid_flight_and_aborts_leave_the_others_exact(llama):
    prompts = _prompts(5, seed=1)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    outputs = {}
    for overlap in (False, True):
        engine = LLM(loaded=llama, overlap=overlap, **OPTIONS).engine
        finished = {}
        for i, prompt in enumerate(prompts[:3]):
            engine.add_request(str(i), prompt, params)
        steps = 0
        while engine.has_work() or steps < 6:
            if steps == 3:
                engine.add_request("3", prompts[3], params)  # joins while a step is in flight
                assert engine.abort("1") is not None
            if steps == 5:
                engine.add_request("4", prompts[4], params)
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out.token_ids
            steps += 1
        outputs[overlap] = finished
    assert sorted(outputs[True]) == ["0", "2", "3", "4"]
    assert outputs[True] == outputs[False]
    alone = _generate(llama, False, [prompts[3]], [params])[0][0]
    assert outputs[True]["3"] == alone


@pytest.mark.parametrize("family,policy,options", [
    ("sdar", "ar", {}),
    ("sdar", "fixed:2", {}),  # a window's last masked position: only those steps are certain
    ("llada", "ar", {"block_size": 4, "cache_mode": "prefix-block"}),
    ("dream", "fixed:2", {"block_size": 4, "cache_mode": "prefix-block"}),  # row p predicts p + 1
])
def test_diffusion_steps_whose_commits_are_certain_overlap_and_decode_the_same_tokens(family, policy, options):
    """A diffusion step whose every window has one masked position left commits exactly those:
    it is kept in flight like a causal step (prefix-block caches). Token for token, with stops,
    unaligned lengths, a sampled request (it keeps its steps synchronous) and a late join."""
    loaded = tiny_loaded(family)
    prompts = _prompts(5, seed=3)
    runs = {}
    for overlap in (False, True):
        llm = LLM(loaded=loaded, overlap=overlap, policy=policy, device="cpu", num_pages=256, page_size=4, **options)
        engine, assumed, finished = llm.engine, 0, {}
        free = {}
        if not runs:  # stop ids from a free run's answers, so requests really end early
            free = {o.request_id: o.token_ids for o in llm.generate(prompts[:2], SamplingParams(max_tokens=9,
                                                                                              ignore_eos=True))}
        stops = runs.get("stops") or [free["offline-0"][3], free["offline-1"][0]]
        runs["stops"] = stops
        params = [SamplingParams(max_tokens=9, stop_token_ids=(stops[0],), ignore_eos=True),
                  SamplingParams(max_tokens=7, stop_token_ids=(stops[1],), ignore_eos=True),
                  SamplingParams(max_tokens=5, ignore_eos=True),
                  SamplingParams(max_tokens=6, temperature=0.8, seed=2, ignore_eos=True)]
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            engine.add_request(str(i), prompt, p)
        steps = 0
        while engine.has_work():
            if steps == 4:
                engine.add_request("late", prompts[4], SamplingParams(max_tokens=11, ignore_eos=True))
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = (out.token_ids, out.finish_reason)
            assumed += engine._in_flight is not None and engine._in_flight.assumed
            steps += 1
        runs[overlap] = finished
        runs[f"assumed {overlap}"] = assumed
    assert runs[True] == runs[False] and len(runs[True]) == 5
    assert runs["assumed True"] > 0 and runs["assumed False"] == 0
