"""Serving random weights at a published shape with replayed acceptance (the 8B-shape serving
sweep's code path, shrunk to ``random-tiny:`` shapes on the CPU): the loader's ``random:``
models, unknown-id detokenisation, the ``replay_acceptance`` option, a real ``optimus serve``
over such a model, and ``optimus bench sweep`` driving it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

from optimus.config import engine_config
from optimus.decoding.replay import ReplayAcceptance, load_acceptance
from optimus.decoding.rules import commit_rule_for, params_rule
from optimus.models.detokenizer import IncrementalDetokenizer
from optimus.policy.elastic.setup import elastic_kwargs, tau_prior_from
from optimus.policy.elastic.latency import LatencyProfile
from optimus.engine.llm import LLM
from optimus.core.params import SamplingParams
from optimus.models.loader import (
    LoadError, RandomModelName, UnknownShapeError, _check_tokenizer_fits, _tokenizer_from_dir, load_model,
    resolve_model_path,
)
from optimus.models.registry import spec_from_config
from optimus.models.shapes import SHAPES, TINY_VOCAB, shape_config

from test_server_support import ServerProcess, serve_argv, sse_events

TEXT_IDS = 8192  # the default model's tokenizer


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def four_per_step(tmp_path) -> Path:
    """An acceptance profile in which a chunk of 8 always commits 4 tokens."""
    return _write(tmp_path / "acceptance.json", {"distribution": {"8": [4]}})


# ---------------------------------------------------------------- loader

def test_random_model_names_parse():
    assert RandomModelName.parse("random:sdar-8b") == RandomModelName("sdar-8b", tiny=False)
    assert RandomModelName.parse("random-tiny:llada-8b") == RandomModelName("llada-8b", tiny=True)
    assert RandomModelName.parse("default") is None and RandomModelName.parse(Path("/models/x")) is None
    assert str(RandomModelName("sdar-8b", tiny=True)) == "random-tiny:sdar-8b"


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_loader_builds_a_tiny_random_model_with_the_default_tokenizer(shape):
    loaded = load_model(f"random-tiny:{shape}", device="cpu", progress=False)
    assert loaded.spec.family == SHAPES[shape]["model_type"] and loaded.spec.arch.vocab_size == TINY_VOCAB
    assert loaded.spec.arch.num_layers == 2 and loaded.model.lm_head.weight.dtype == torch.float32
    assert loaded.tokenizer.vocab_size == TEXT_IDS and loaded.path.name == f"random-tiny:{shape}"
    assert loaded.generation_config == {} and not loaded.model.training
    assert loaded.model.model.rotary.inv_freq.dtype == torch.float32


def test_random_model_greedy_proposes_only_ids_the_tokenizer_shows_as_text():
    loaded = load_model("random-tiny:sdar-8b", device="cpu", progress=False)
    head = loaded.model.lm_head.weight
    special = list(loaded.tokenizer.all_special_ids)
    assert torch.all(head[TEXT_IDS:] == 0) and torch.all(head[special] == 0)
    assert torch.all(head[100:TEXT_IDS].abs().sum(-1) > 0)
    hidden = torch.randn(512, loaded.spec.arch.hidden_size)
    proposed = loaded.model.logits(hidden).argmax(-1)
    assert int(proposed.max()) < TEXT_IDS and not set(proposed.tolist()) & set(special)


def test_unknown_shape_error_names_the_valid_shapes():
    with pytest.raises(UnknownShapeError, match="'sdar-9b'.*llada-8b, llada2-mini, llama-8b, sdar-30b-a3b, sdar-8b") as info:
        load_model("random:sdar-9b", device="cpu")
    assert isinstance(info.value, LoadError)
    with pytest.raises(ValueError, match="known shapes: llada-8b, llada2-mini, llama-8b, sdar-30b-a3b, sdar-8b"):
        shape_config("")


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_published_shape_serves_the_default_tokenizer(shape):
    """Checked on the config alone: building an 8B model here would take 32 GB."""
    spec = spec_from_config(shape_config(shape))
    _check_tokenizer_fits(spec, _tokenizer_from_dir(resolve_model_path("default")), shape)
    assert spec.arch.vocab_size > TEXT_IDS and all(i >= TEXT_IDS for i in spec.eos_ids)


# ---------------------------------------------------------------- detokenisation

def test_decode_skips_ids_past_the_tokenizer_vocabulary():
    tok = load_model("random-tiny:sdar-8b", device="cpu", progress=False).tokenizer
    known = tok.encode("the quick brown fox")
    mixed = [known[0], TEXT_IDS, *known[1:], TINY_VOCAB - 1, 151_000]
    assert tok.decode(mixed) == tok.decode(known) == "the quick brown fox"
    detok = IncrementalDetokenizer(tok)
    for n in range(1, len(mixed) + 1):
        detok.update(mixed[:n])
    assert detok.finish(mixed) == "the quick brown fox"


# ---------------------------------------------------------------- replayed acceptance

def test_load_acceptance_reads_histograms_and_distributions(tmp_path):
    hist = _write(tmp_path / "h.json", {"tau_per_chunk": {"4": 2.5}, "histograms": {"4": {"2": 1, "3": 2}}})
    dist = _write(tmp_path / "d.json", {"distribution": {"8": [5, 7]}})
    bare = _write(tmp_path / "b.json", {"16": [9]})
    assert load_acceptance(hist).by_chunk == {4: [2, 3, 3]} and load_acceptance(hist).by_open == {}
    assert load_acceptance(dist).by_chunk == {8: [5, 7]} and load_acceptance(bare).by_chunk == {16: [9]}
    with pytest.raises(ValueError, match="not an acceptance profile"):
        load_acceptance(_write(tmp_path / "tau.json", {"model": "x", "tau_per_chunk": {"4": 2.5}}))
    with pytest.raises(ValueError, match="no observations for chunk \\[8\\]"):
        load_acceptance(_write(tmp_path / "e.json", {"distribution": {"4": [1], "8": []}}))


def test_the_committed_acceptance_profile_loads():
    path = Path(__file__).resolve().parents[1] / "benchmarks/results/cpu/acceptance/history/2026-11-25_6df4761_model_v1.json"
    profile = load_acceptance(path)
    assert sorted(profile.by_chunk) == [1, 2, 4, 8, 16, 32] and set(profile.by_chunk[1]) == {1}


def test_replay_draws_from_the_steps_with_as_many_masked_positions(tmp_path):
    """A full 32-window commits what full windows committed; a window with 4 left commits what
    4-left windows did; an unseen count takes the nearest one, rescaled."""
    path = _write(tmp_path / "p.json", {"histograms": {"32": {"1": 1, "30": 1}},
                                        "by_open": {"32": {"32": {"30": 1}, "4": {"1": 1}}}})
    profile = load_acceptance(path)
    assert profile.by_open == {32: {32: [30], 4: [1]}}
    rule, params = ReplayAcceptance(profile), SamplingParams()
    assert len(rule(torch.rand(32), params, 32)) == 30
    assert len(rule(torch.rand(4), params, 32)) == 1
    assert len(rule(torch.rand(8), params, 32)) == 2  # nearest seen: 4 masked -> 1 commit, x 8/4
    iid = ReplayAcceptance(load_acceptance(_write(tmp_path / "iid.json", {"histograms": {"32": {"30": 1}}})))
    assert len(iid(torch.rand(4), params, 32)) == 4  # without by_open: 30 drawn, clipped to 4 left


def test_window_tau_is_commits_per_step_of_a_window_that_starts_full(tmp_path):
    """Full window of 4: commits 2, then the 2 left clear in one step: 4 commits over 2 steps.
    elastic's prior reads it from a profile with by_open (what the replay will show)."""
    data = {"tau_per_chunk": {"4": 3.0}, "histograms": {"4": {"2": 2, "3": 1, "1": 1}},
            "by_open": {"4": {"4": {"2": 1}, "3": {"3": 1}, "2": {"2": 1}, "1": {"1": 1}}}}
    path = _write(tmp_path / "p.json", data)
    assert load_acceptance(path).window_tau() == {4: 2.0}
    assert tau_prior_from(path) == {4: 2.0}
    del data["by_open"]
    assert tau_prior_from(_write(tmp_path / "q.json", data)) == {4: 3.0}


def test_replay_acceptance_option_picks_the_commit_rule(four_per_step):
    assert commit_rule_for(engine_config()) is params_rule
    rule = commit_rule_for(engine_config(replay_acceptance=str(four_per_step)))
    assert isinstance(rule, ReplayAcceptance) and rule.acceptance.by_chunk == {8: [4]}


def test_replay_acceptance_seeds_elastics_tau_prior(tmp_path):
    profile = LatencyProfile.synthetic(0.01, 64, 1e-4).save(tmp_path / "profile.json")
    replay = _write(tmp_path / "replay.json", {"histograms": {"4": {"2": 1, "4": 1}, "8": {"6": 2}}})
    explicit = _write(tmp_path / "tau.json", {"tau_per_chunk": {"4": 1.5}})

    def prior(**options) -> dict:
        config = engine_config(policy="elastic", profile_path=str(profile), **options)
        engine = SimpleNamespace(config=config, device=torch.device("cpu"),
                                 spec=SimpleNamespace(arch=SimpleNamespace(moe=None)),  # dense
                                 loaded=SimpleNamespace(path=Path("random-tiny:sdar-8b")))
        return elastic_kwargs(engine)["tau_prior"]

    assert prior(replay_acceptance=str(replay)) == {4: 3.0, 8: 6.0}
    assert prior(replay_acceptance=str(replay), acceptance_profile=str(explicit)) == {4: 1.5}


def test_engine_commits_what_the_replayed_profile_says(four_per_step):
    llm = LLM("random-tiny:sdar-8b", device="cpu", num_pages=64, policy="fixed:8",
              replay_acceptance=str(four_per_step))
    out = llm.generate([list(range(100, 132))], SamplingParams(max_tokens=64))[0]  # a whole prompt block
    stats = llm.engine.stats
    assert len(out.token_ids) == 64 and out.finish_reason == "length"
    assert stats.chunk_size_counts[8] == 64 // 4 and stats.committed_per_chunk[8] == 64


# ---------------------------------------------------------------- the server and the sweep

def test_server_on_a_random_shape_replays_acceptance(tmp_path, four_per_step):
    from optimus.bench.prometheus import counter_deltas, dllm_summary, parse_prometheus

    # Steps paced at 8 ms on an emulated device: the real tiny forward takes about a millisecond,
    # and a front-end slower than the engine merges outputs into fewer frames (a fresh-clone run
    # saw 3 frames for 64 steps), so the streaming check below needs a known pace.
    pace = LatencyProfile.synthetic(0.008, 4096, 0.0).save(tmp_path / "pace.json")
    argv = serve_argv("random-tiny:sdar-8b", "--policy", "fixed:8", "--replay-acceptance", str(four_per_step),
                      "--emulate-device", str(pace), "--num-pages", "64", "--log-level", "warning")
    with ServerProcess(argv, tmp_path / "server.log") as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        server.wait_healthy()
        assert http.get("/v1/models").json()["data"][0]["id"] == "random-tiny:sdar-8b"
        before = parse_prometheus(http.get("/metrics").text)
        # 256 tokens, about 64 steps (0.5 s): each frame carries what was committed since the last.
        body = {"model": "random-tiny:sdar-8b", "prompt": "the quick brown fox", "max_tokens": 256,
                "stream": True, "stream_options": {"include_usage": True}}
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            events = sse_events(r.iter_lines())
        # The front-end's metrics are a snapshot of the engine process's, up to 0.1 s late:
        # read them once they hold the 256 tokens the stream delivered (or after 5 s).
        deadline = time.monotonic() + 5
        while True:
            after = parse_prometheus(http.get("/metrics").text)
            done = counter_deltas(before, after).get("optimus_tokens_committed_total", 0) >= 256
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert "Traceback" not in server.log(), server.log()
    frames = [e for e in events if isinstance(e, dict) and e.get("choices")]
    usage = next(e["usage"] for e in events if isinstance(e, dict) and e.get("usage"))
    # No end token: the random model runs to max_tokens, streaming text as it commits.
    assert usage["completion_tokens"] == 256 and frames[-1]["choices"][0]["finish_reason"] == "length"
    assert len(frames) > 4 and "".join(f["choices"][0]["text"] for f in frames).strip()
    dllm = dllm_summary(counter_deltas(before, after))
    # Replayed: 4 commits per chunk-8 step (the request's own threshold rule would commit ~1 on
    # random confidences); the prompt's tail shares the first block, so a few short chunks.
    share = dllm["chunk_size_share"]
    assert 256 / 4 <= dllm["request_steps"] <= 256 / 4 + 4 and share["8"] >= 0.75
    assert 3.0 <= dllm["tau"] <= 4.0


def test_bench_sweep_drives_a_random_shape_server(tmp_path, four_per_step):
    from optimus.cli import main

    out = tmp_path / "sweep"
    server_args = f"--device cpu --num-pages 64 --replay-acceptance {four_per_step} --log-level warning"
    rc = main(["bench", "sweep", "--model", "random-tiny:sdar-8b", "--policies", "fixed:8", "--rates", "50",
               "--slo", "ttft:60000,tpot:60000", "--dataset", "random", "--num-prompts", "3", "--input-len", "16",
               "--output-len", "32", "--ignore-eos", "--disable-tqdm", "--server-args", server_args,
               "--out-dir", str(out)])
    assert rc == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert "partial" not in sweep  # the finished sweep replaces the per-policy saves
    run = sweep["policies"]["fixed:8"]["runs"][0]
    assert run["completed"] == 3 and run["total_output_tokens"] == 3 * 32
    assert 3.0 <= run["dllm"]["tau"] <= 4.0


def test_sweep_hands_over_each_finished_policy():
    """A sweep cut off by a time limit keeps the policies it finished (sweep.json per policy)."""
    from contextlib import contextmanager

    from optimus.bench.metrics import SLO
    from optimus.bench.sweep import SweepConfig, run_sweep

    @contextmanager
    def launch(policy):
        yield policy

    def bench(url, rate):
        return {"output_throughput": rate, "slo_attainment": 1.0, "p99_ttft_ms": 1.0, "p99_tpot_ms": 1.0,
                "dllm": {"tau": 1.0}}

    seen = []
    cfg = SweepConfig(("elastic", "ar"), (1.0, 2.0), SLO(ttft_ms=100))
    final = run_sweep(cfg, launch, bench, log=lambda line: None, on_policy=seen.append)
    assert [list(s["policies"]) for s in seen] == [["elastic"], ["elastic", "ar"]]
    assert seen[-1] == final and seen[0]["policies"]["elastic"]["capacity"] == 2.0


def test_replay_reseed_repeats_the_draws(tmp_path):
    """Common random numbers: after reseed(s) the same calls commit the same counts."""
    path = _write(tmp_path / "p.json", {"histograms": {"8": {"1": 1, "4": 1, "8": 1}}})
    rule, params = ReplayAcceptance(load_acceptance(path)), SamplingParams()

    def counts():
        return [len(rule(torch.rand(8), params, 8)) for _ in range(40)]

    rule.reseed(5)
    first = counts()
    rule.reseed(5)
    assert counts() == first and len(set(first)) == 3
