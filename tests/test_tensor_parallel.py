"""Tensor parallelism on CPU: two processes over gloo give the tokens one process gives (fp32),
for every family and policy, with requests joining and aborted mid-run; and the pieces it is
made of (slices, the vocabulary-parallel greedy pick) against their whole-tensor meaning."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fixtures.checkpoints import FAMILIES, MOE_FAMILIES
from optimus.config import engine_config
from optimus.core.params import SamplingParams
from optimus.core.scoring import ScoreRequest
from optimus.engine.engine import Engine
from optimus.engine.scoring import score_now
from optimus.kernels.greedy import argmax_prob
from optimus.models.registry import spec_from_config
from optimus.parallel.group import TPGroup
from optimus.parallel.head import ModelParallel
from optimus.parallel.sharding import Shard, ShardingError, local_spec, vocab_bounds
from optimus.policy.elastic.latency import LatencyProfile
from optimus.policy.registry import make_policy
from fixtures.checkpoints import tiny_config

GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
PROMPTS = {"a": [5, 6, 7, 8, 9], "b": [11, 12, 13], "c": [21, 22, 23, 24, 25, 26, 27], "d": [31, 32]}


def _script(engine: Engine, policy_name: str) -> dict[str, tuple]:
    """a and b from the start, c joins after two steps, d after four and is aborted after six
    steps; one sampled request (seeded) reads whole gathered logits. -> final tokens per id."""
    if policy_name != "elastic":
        engine.use_policy(make_policy(policy_name))
    sampled = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.9, seed=7)
    engine.add_request("a", PROMPTS["a"], GREEDY)
    engine.add_request("b", PROMPTS["b"], sampled)
    done: dict[str, tuple] = {}
    for step in range(200):
        if step == 2:
            engine.add_request("c", PROMPTS["c"], GREEDY)
        if step == 4:
            engine.add_request("d", PROMPTS["d"], GREEDY)
        if step == 6:
            out = engine.abort("d")
            done["d"] = ("aborted", tuple(out.token_ids) if out is not None else None)
        for out in engine.step():
            if out.finished and out.request_id not in done:
                done[out.request_id] = (out.finish_reason, tuple(out.token_ids))
        if not engine.has_work():
            break
    return done


def _timeless(engine: Engine) -> None:
    """Elastic plans from measured step times; hold them out of its feedback so both engines
    make the same choices from the same commits (what this test compares is the tokens)."""
    observe = engine.policy.observe
    engine.policy.observe = lambda fb: observe(dataclasses.replace(fb, latency_s=0.0, overhead_s=0.0))


def _engine(checkpoint, tp: int, profile, block: int | None, expert_parallel: bool = False) -> Engine:
    config = engine_config(model=str(checkpoint), device="cpu", dtype="float32", num_pages=96, policy="elastic",
                           profile_path=str(profile), tensor_parallel=tp, block_size=block,
                           expert_parallel=expert_parallel)
    engine = Engine(config)
    engine.post.stream_text = False
    _timeless(engine)
    return engine


@pytest.mark.parametrize("family", sorted(FAMILIES) + sorted(MOE_FAMILIES))
def test_two_ranks_decode_the_tokens_of_one(family, tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint(family)
    profile = LatencyProfile.synthetic(0.01, 64, 1e-4).save(tmp_path / "profile.json")
    block = None if family.startswith("sdar") else 8
    one, two = _engine(checkpoint, 1, profile, block), _engine(checkpoint, 2, profile, block)
    try:
        assert two.runner.model.parallel is not None and one.runner.model.parallel is None
        assert two.storage.keys[0].shape[2] * 2 == one.storage.keys[0].shape[2]  # KV pages hold half the heads
        causal = family in ("llama", "qwen2", "qwen3")
        for policy in ["ar"] if causal else ["elastic", "fixed:2", "ar"]:
            expected, got = _script(one, policy), _script(two, policy)
            assert got == expected, policy
            assert set(expected) == set(PROMPTS) and len(expected["a"][1]) == 8
            assert two.allocator.used_pages == 0
        request = ScoreRequest(((5, 6, 7, 8, 9, 10, 11),), (3,), top_n=2)  # echo/logprobs: gathered logits
        scored = [score_now(request, e.runner.model, e.spec, samples=2, block=e.block_size).sequences[0]
                  for e in (one, two)]
        assert scored[1].top_ids == scored[0].top_ids
        assert scored[1].logprobs == pytest.approx(scored[0].logprobs, rel=1e-4, abs=1e-5)
    finally:
        two.close()


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_two_ranks_with_experts_placed_decode_the_tokens_of_one(family, tiny_checkpoint, tmp_path):
    """Expert parallelism: each rank holds half the routed experts whole (and half of each
    shared expert's columns); the tokens are those of one process."""
    checkpoint = tiny_checkpoint(family)
    profile = LatencyProfile.synthetic(0.01, 64, 1e-4).save(tmp_path / "profile.json")
    block = None if family.startswith("sdar") else 8
    one, two = _engine(checkpoint, 1, profile, block), _engine(checkpoint, 2, profile, block, expert_parallel=True)
    try:
        sparse = next(layer.mlp for layer in two.runner.model.model.layers if hasattr(layer.mlp, "experts"))
        full = next(layer.mlp for layer in one.runner.model.model.layers if hasattr(layer.mlp, "experts"))
        assert sparse.placed == (0, 4) and sparse.experts.w13.shape == (4,) + tuple(full.experts.w13.shape[1:])
        for policy in ["elastic", "fixed:2"]:
            expected, got = _script(one, policy), _script(two, policy)
            assert got == expected, policy
            assert set(expected) == set(PROMPTS) and len(expected["a"][1]) == 8
    finally:
        two.close()


def test_a_vocabulary_that_leaves_a_rank_no_rows_is_refused():
    spec = spec_from_config(tiny_config("llama"))
    with_vocab = lambda v: dataclasses.replace(spec, arch=dataclasses.replace(spec.arch, vocab_size=v))  # noqa: E731
    assert vocab_bounds(9, 3, 4) == (9, 9)  # ceil(9 / 4) = 3 rows each: the fourth rank gets none
    with pytest.raises(ShardingError, match="leaves the last rank no rows.*vocab_size=1"):
        local_spec(with_vocab(1), 2)  # the tiny model's heads split 2 ways only
    assert local_spec(with_vocab(3), 2).arch.vocab_size == 3


def test_expert_parallel_places_whole_experts_and_keeps_their_names():
    spec = spec_from_config(tiny_config("sdar_moe"))
    name = "model.layers.0.mlp.experts.{}.down_proj.weight"  # layer 0 is sparse
    full = torch.randn(spec.arch.hidden_size, spec.arch.moe.expert_size)
    shards = [Shard(spec, r, 2, expert_parallel=True) for r in range(2)]
    assert [s.expert_range for s in shards] == [(0, 4), (4, 8)]
    assert [s.holds(name.format(5)) for s in shards] == [False, True]
    assert shards[1].slice(name.format(5), full) is full  # whole, not a column slice
    assert Shard(spec, 1, 2).slice(name.format(5), full).shape[1] == full.shape[1] // 2  # sliced without it
    assert shards[0].holds("model.layers.0.mlp.gate.weight") and shards[1].holds("model.embed_tokens.weight")
    local = shards[1].local_model().state_dict()
    assert name.format(5) in local and name.format(3) not in local
    with pytest.raises(ShardingError, match="not a mixture-of-experts"):
        local_spec(spec_from_config(tiny_config("llama")), 2, experts=(0, 1))
    with pytest.raises(ShardingError, match="num_experts=8"):
        local_spec(spec, 3, experts=(0, 2))


# Sampled requests of every kind, next to greedy ones (min_tokens: ids of both vocabulary halves suppressed).
SAMPLED = {
    "greedy": GREEDY,
    "top_k": SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.8, top_k=5, seed=3),
    "top_p": SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, top_p=0.7, seed=5),
    "both": SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.7, top_k=40, top_p=0.8, seed=11),
    "min_tokens": SamplingParams(max_tokens=8, temperature=0.9, seed=2, min_tokens=6, stop_token_ids=(20, 250)),
    "greedy_min": SamplingParams(max_tokens=8, min_tokens=4, stop_token_ids=(21, 251)),
}


def _sampled_script(engine: Engine) -> dict[str, tuple]:
    engine.use_policy(make_policy("fixed:2"))
    for i, (name, params) in enumerate(SAMPLED.items()):
        engine.add_request(name, [5 + i, 6, 7, 8, 9 + 2 * i], params)
    done: dict[str, tuple] = {}
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = (out.finish_reason, tuple(out.token_ids))
    return done


def test_two_ranks_sample_the_tokens_of_one_without_gathering_logits(tiny_checkpoint, tmp_path, monkeypatch):
    """Seeded top-k / top-p / min_tokens requests: the tokens of one process, drawn on the vocabulary
    slices: rank 0 never gathers logit rows (no ModelParallel.logits call, no gather a slice wide)."""
    profile = LatencyProfile.synthetic(0.01, 64, 1e-4).save(tmp_path / "profile.json")
    checkpoint = tiny_checkpoint("llada")
    one, two = _engine(checkpoint, 1, profile, 8), _engine(checkpoint, 2, profile, 8)
    widths, logits_calls = [], []
    gather, logits = TPGroup.all_gather, ModelParallel.logits
    monkeypatch.setattr(TPGroup, "all_gather", lambda g, x: widths.append(x.shape[-1]) or gather(g, x))
    monkeypatch.setattr(ModelParallel, "logits", lambda p, x: logits_calls.append(x.shape) or logits(p, x))
    try:
        expected, got = _sampled_script(one), _sampled_script(two)
        assert got == expected and set(got) == set(SAMPLED)
        head = two.runner.model.parallel
        assert logits_calls == [] and head.rows_gathered_whole == 0
        assert 5 in widths and head.vocab // 2 not in widths  # the draw's winners ran; no slice crossed
    finally:
        two.close()


# ---- the pieces ---------------------------------------------------------------------------------
class _LocalGroup:
    """Every rank's values at hand (one process plays all ranks): all_gather returns them."""

    def __init__(self, parts: list[torch.Tensor], rank: int) -> None:
        self.parts, self.rank, self.size, self.leader = parts, rank, len(parts), rank == 0

    def all_gather(self, x):
        return self.parts


def _rank_stats(logits: torch.Tensor, size: int) -> list[torch.Tensor]:
    vocab = logits.shape[1]
    out = []
    for rank in range(size):
        lo, hi = vocab_bounds(vocab, rank, size)
        local = logits[:, lo:hi]
        m, idx = local.max(-1)
        out.append(torch.stack([m, (idx + lo).float(), (local - m[:, None]).exp().sum(-1)], -1))
    return out


@pytest.mark.parametrize("size", [2, 3, 4])
def test_vocab_parallel_greedy_is_the_whole_rows_argmax_and_probability(size):
    torch.manual_seed(0)
    logits = torch.randn(16, 101) * 4
    logits[3, 10] = logits[3, 90] = logits[3].max() + 1  # a tie across ranks: the lower id wins
    head = ModelParallel(_LocalGroup(_rank_stats(logits, size), 0), vocab_bounds(101, 0, size), 101)
    lo, hi = head.lo, head.hi
    tokens, conf = head.greedy(logits[:, lo:hi])
    want_tokens, want_conf = argmax_prob(logits, "torch")
    assert torch.equal(tokens, want_tokens) and tokens[3] == 10
    torch.testing.assert_close(conf, want_conf, rtol=1e-5, atol=1e-7)


def test_vocab_bounds_cover_the_vocabulary_once():
    for vocab, size in [(101, 2), (101, 4), (8, 8), (32000, 3)]:
        bounds = [vocab_bounds(vocab, r, size) for r in range(size)]
        assert bounds[0][0] == 0 and bounds[-1][1] == vocab
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert len({hi - lo for lo, hi in bounds[:-1]}) <= 1


def test_fused_qkv_is_split_head_by_head_per_segment():
    spec = spec_from_config(tiny_config("llada2_moe"))
    arch = spec.arch
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    full = torch.arange(q + 2 * kv, dtype=torch.float32)[:, None].repeat(1, 3)
    parts = [Shard(spec, r, 2).slice("model.layers.0.attention.query_key_value.weight", full) for r in range(2)]
    # rank r: q heads [r*Hq/2, (r+1)*Hq/2), then its k heads, then its v heads
    for r, part in enumerate(parts):
        rows = part[:, 0].long().tolist()
        assert rows == (list(range(r * q // 2, (r + 1) * q // 2)) + list(range(q + r * kv // 2, q + (r + 1) * kv // 2))
                        + list(range(q + kv + r * kv // 2, q + kv + (r + 1) * kv // 2)))
    row = Shard(spec, 1, 2).slice("model.layers.0.attention.dense.weight", torch.arange(12.0).view(2, 6))
    assert row.tolist() == [[3.0, 4.0, 5.0], [9.0, 10.0, 11.0]]


def test_a_shape_that_does_not_divide_is_refused_by_name():
    spec = spec_from_config(tiny_config("llama"))
    assert local_spec(spec, 2).arch.num_heads == spec.arch.num_heads // 2
    with pytest.raises(ShardingError, match="--tensor-parallel 3 does not divide.*num_attention_heads=4"):
        local_spec(spec, 3)


# ---- served --------------------------------------------------------------------------------------
def test_served_two_ranks_answer_as_one_and_survive_a_lost_rank(tiny_checkpoint, tmp_path):
    """``optimus serve --tensor-parallel 2``: the tokens of one process; when a worker rank is
    killed, the engine process fails its steps, is restarted with a fresh group, and serves."""
    import os
    import re
    import signal
    import time

    import httpx
    from optimus.engine.llm import LLM
    from test_server_support import ServerProcess, serve_argv

    checkpoint = tiny_checkpoint("sdar")
    body = {"prompt": "the quick brown fox", "max_tokens": 8, "ignore_eos": True}
    llm = LLM(str(checkpoint), device="cpu", policy="fixed:4", num_pages=64)
    want = llm.generate(body["prompt"], SamplingParams(max_tokens=8, ignore_eos=True))[0].text
    argv = serve_argv(checkpoint, "--tensor-parallel", "2", "--policy", "fixed:4", "--num-pages", "64",
                      "--engine-restarts", "1")
    with ServerProcess(argv, tmp_path / "server.log") as server:
        server.wait_healthy(timeout=120)
        first = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert first.status_code == 200 and first.json()["choices"][0]["text"] == want
        worker = int(re.search(r"worker processes (\d+)", server.log()).group(1))
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # requests fail cleanly until the new group stands
            r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200 or r.json()["error"]["code"] in ("internal_error", "engine_dead"), r.text
            if r.status_code == 200:
                break
            time.sleep(0.5)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, server.log()
        assert server.log().count("tensor parallel: 2 ranks joined") == 2


def test_rank_zero_stops_waiting_when_a_worker_dies_before_the_group_forms():
    import threading

    from optimus.parallel.launch import join_watching

    class Worker:
        name, exitcode = "optimus-tp-rank1", None

    worker, never = Worker(), threading.Event()
    threading.Timer(0.3, lambda: setattr(worker, "exitcode", 1)).start()
    with pytest.raises(RuntimeError, match="optimus-tp-rank1 exited with code 1 before the group formed"):
        join_watching([worker], never.wait, poll_s=0.05)  # a rendezvous that never completes
    never.set()
    assert join_watching([Worker()], lambda: "group") == "group"
