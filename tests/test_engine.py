"""End-to-end engine behaviour on tiny random models: batch invariance and lifecycle."""

import random
import zlib

import pytest

from optimus.engine.llm import LLM
from optimus.core.params import SamplingParams
from fixtures.engine import tiny_loaded




def _llm(family, policy, **kw):
    return LLM(loaded=tiny_loaded(family), policy=policy, device="cpu", num_pages=kw.pop("num_pages", 256),
               page_size=4, block_size=kw.pop("block_size", 8), **kw)


def _prompts(n, seed=0, vocab=200):
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(1, 19))] for _ in range(n)]


POLICIES = ["ar", "fixed:3", "fixed:8", "elastic"]


class ReplayChunks:
    """Test policy: hands out a recorded chunk-size sequence per request, in arrival order."""

    name = "replay"

    def __init__(self, histories):
        self.histories = {f"offline-{i}": list(h) for i, h in enumerate(histories)}

    def choose(self, view):
        # Past the recorded sizes: a window planned after the request's last commit, while that
        # step was still in flight (overlap); it ends before the window's commits are read.
        return [h.pop(0) if (h := self.histories[r.request_id]) else 1 for r in view.requests]

    def observe(self, feedback):
        pass


@pytest.mark.parametrize("family", ["sdar", "llada", "dream"])
@pytest.mark.parametrize("policy", POLICIES)
def test_batch_invariance(family, policy):
    """Alone or in a batch of mixed lengths, a request decodes the same tokens. For `elastic`
    the chunk sizes themselves depend on load (that is the point of the policy), so the solo
    run replays the chunk sizes the request got in the batch: batching must not change the
    numerics of any given schedule."""
    llm = _llm(family, policy)
    prompts = _prompts(6, seed=zlib.crc32(f"{family}/{policy}".encode()) % 1000)
    params = [SamplingParams(max_tokens=random.Random(i).randint(3, 14), ignore_eos=True) for i in range(6)]
    together = llm.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, together):
        solo = _llm(family, "fixed:1" if policy == "elastic" else policy)
        if policy == "elastic":
            solo.engine.scheduler.policy = ReplayChunks([out.stats.chunk_history])
        alone = solo.generate([prompt], p)[0]
        assert out.token_ids == alone.token_ids
        assert len(out.token_ids) == p.max_tokens and out.finish_reason == "length"
    assert llm.engine.allocator.used_pages == 0


def test_causal_model_runs_one_token_per_step():
    llm = _llm("llama", "fixed:8")
    out = llm.generate(_prompts(3), SamplingParams(max_tokens=5, ignore_eos=True))
    for o in out:
        assert o.stats.steps == 5 and o.stats.chunk_sizes == {1: 5}


def test_sampling_with_seed_is_reproducible_and_batch_invariant():
    p = SamplingParams(max_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=123, ignore_eos=True)
    a = _llm("sdar", "fixed:4").generate(_prompts(3), [p] * 3)
    b = _llm("sdar", "fixed:4").generate(_prompts(3)[1:2], p)
    assert a[1].token_ids == b[0].token_ids


def test_eos_stops_and_min_tokens_defers_it():
    llm = _llm("sdar", "fixed:8")
    eos = llm.engine.spec.eos_ids[0]
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=10, stop_token_ids=(eos,), ignore_eos=True))[0]
    assert out.finish_reason in ("stop", "length")
    assert eos not in out.token_ids


def test_stop_string_cuts_text():
    llm = _llm("sdar", "fixed:4")
    first = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert len(first.text) >= 2
    stop = first.text[1:3]
    cut = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=12, ignore_eos=True, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.text == first.text[:first.text.find(stop)]


def test_bad_requests_raise_clear_errors():
    llm = _llm("sdar", "fixed:4")
    with pytest.raises(ValueError, match="empty"):
        llm.engine.add_request("x", [], SamplingParams())
    with pytest.raises(ValueError, match="context length"):
        llm.engine.add_request("y", [1] * 10, SamplingParams(max_tokens=100_000))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="policy"):
        SamplingParams(policy="fixed:x")


def test_abort_frees_pages():
    llm = _llm("sdar", "fixed:2")
    for i in range(4):
        llm.engine.add_request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=40, ignore_eos=True))
    for _ in range(3):
        llm.engine.step()
    assert llm.engine.allocator.used_pages > 0
    for i in range(4):
        out = llm.engine.abort(f"r{i}")
        assert out.finished and out.finish_reason == "abort"
    assert llm.engine.allocator.used_pages == 0 and not llm.engine.has_work()


def test_extreme_temperature_and_min_tokens_do_not_break_the_engine():
    llm = _llm("sdar", "fixed:4")
    params = [SamplingParams(max_tokens=6, temperature=1e-300, ignore_eos=True),
              SamplingParams(max_tokens=6, min_tokens=3, temperature=0.7, seed=1),
              SamplingParams(max_tokens=6, min_tokens=6)]
    outs = llm.generate(_prompts(3), params)
    assert all(o.finished for o in outs)
    assert len(outs[0].token_ids) == 6
    eos = set(llm.engine.spec.eos_ids)
    assert not eos & set(outs[2].token_ids[:6])
    assert llm.engine.stats.running == 0 and llm.engine.stats.kv_usage == 0.0


@pytest.mark.parametrize("policy", ["elastic", "fixed:4"])  # fixed: the scheduler's shortcut must yield
def test_per_request_policy_override(policy):
    llm = _llm("sdar", policy)
    outs = llm.generate(_prompts(3), [SamplingParams(max_tokens=12, ignore_eos=True, policy="fixed:2"),
                                      SamplingParams(max_tokens=12, ignore_eos=True, policy="ar"),
                                      SamplingParams(max_tokens=12, ignore_eos=True)])
    assert set(outs[0].stats.chunk_history) <= {1, 2} and 2 in outs[0].stats.chunk_history
    assert set(outs[1].stats.chunk_history) == {1}
    if policy == "fixed:4":
        assert 4 in outs[2].stats.chunk_history and max(outs[2].stats.chunk_history) == 4


def test_outputs_handed_out_keep_their_ids_while_the_answer_grows():
    llm = _llm("sdar", "fixed:4")
    engine = llm.engine
    engine.add_request("a", _prompts(1)[0], SamplingParams(max_tokens=16, ignore_eos=True))
    seen = []
    while engine.has_work():
        seen += [(out, tuple(out.token_ids)) for out in engine.step()]
    assert len(seen) > 2 and seen[-1][0].finished
    for out, ids in seen:  # a view of the growing answer, never changed after the fact
        assert out.token_ids == ids and len(out.token_ids) == len(ids) and list(out.token_ids) == list(ids)
    assert all(len(a) <= len(b) for (_, a), (_, b) in zip(seen, seen[1:])) and len(seen[-1][1]) == 16


def test_close_gives_back_the_cache_and_keeps_the_model():
    import gc
    import weakref
    llm = _llm("sdar", "fixed:4")
    llm.generate(_prompts(2), SamplingParams(max_tokens=4, ignore_eos=True))
    storage, model = weakref.ref(llm.engine.storage), llm.engine.loaded.model
    llm.engine.close()
    gc.collect()
    assert storage() is None  # nothing keeps the KV cache alive: a next engine can take the memory
    assert next(model.parameters()).numel() > 0


def test_an_engine_collects_cycles_less_often_and_never_more_often():
    import gc
    from optimus.engine.builder import GC_YOUNG_THRESHOLD
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)  # Python's default
        _llm("sdar", "ar")
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 10, 10)
        gc.set_threshold(10 * GC_YOUNG_THRESHOLD, 3, 4)  # a process's own, larger setting stays
        _llm("sdar", "ar")
        assert gc.get_threshold() == (10 * GC_YOUNG_THRESHOLD, 3, 4)
    finally:
        gc.set_threshold(*saved)


def test_sampled_rows_pass_through_the_head_in_bounded_parts(monkeypatch):
    from types import SimpleNamespace
    from optimus.engine import postprocess
    wants = [SimpleNamespace(positions=(0,) * n) for n in (3, 3, 5, 1, 9)]
    assert [[len(w.positions) for w in p] for p in postprocess._by_rows(wants, 6)] == [[3, 3], [5, 1], [9]]
    # A step's sampled rows split over several passes decode as in one pass (draws are per row).
    p = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True)
    whole = _llm("sdar", "fixed:4").generate(_prompts(3), [p] * 3)
    monkeypatch.setattr(postprocess, "SAMPLED_ROWS_PER_PASS", 2)
    split = _llm("sdar", "fixed:4").generate(_prompts(3), [p] * 3)
    assert [o.token_ids for o in whole] == [o.token_ids for o in split]
