"""``optimus generate`` on tiny random checkpoints of every family (CPU): on the engine by
default, with the reference decoders behind ``--reference``."""

from __future__ import annotations

import re

import pytest

from optimus.cli import main
from fixtures import FAMILIES, make_tiny_checkpoint

STATS = re.compile(r"^\[(\w[\w-]*)\] prompt=(\d+) answer=(\d+) steps=(\d+) tokens=(\d+) "
                   r"tokens/step=([\d.]+) wall=([\d.]+)s$")
ENGINE_STATS = re.compile(r"^\[engine (\S+)\] prompt=(\d+) answer=(\d+) steps=(\d+) tokens/step=([\d.]+) "
                          r"committed=(\d+) chunks=(\S+) wall=([\d.]+)s$")
NATURAL = {"llada": "llada", "dream": "dream", "sdar": "sdar", "llama": "ar", "qwen2": "ar", "qwen3": "ar"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ckpt")
    return {family: make_tiny_checkpoint(root / family, family) for family in FAMILIES}


def _stats_line(out: str, pattern: re.Pattern = STATS) -> re.Match:
    match = pattern.match(out.strip().splitlines()[-1])
    assert match, out
    return match


@pytest.fixture
def no_reference(monkeypatch):
    """The reference decoders fail if called: what passes ran on the engine."""
    import optimus.reference.algorithms as algorithms

    def refuse(*args, **kwargs):
        raise AssertionError("the reference decoder ran")

    monkeypatch.setattr(algorithms, "decode", refuse)


# ---- on the engine ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(NATURAL))
def test_generate_runs_each_family_on_the_engine(checkpoints, capsys, no_reference, family):
    for extra in ([], ["--chat", "--temperature", "0.7", "--seed", "3"]):
        code = main(["generate", "--model", str(checkpoints[family]), "--prompt", "hello world",
                     "--max-tokens", "8", "--device", "cpu", "--policy", "fixed:4", *extra])
        out = capsys.readouterr().out
        assert code == 0
        stats = _stats_line(out, ENGINE_STATS)
        policy, answer, steps, per_step, committed = (stats.group(1), int(stats.group(3)), int(stats.group(4)),
                                                      float(stats.group(5)), int(stats.group(6)))
        assert policy == "fixed:4" and answer <= 8 and steps >= 1 and committed >= answer
        assert per_step == pytest.approx(answer / steps, abs=0.01)


def test_generate_reports_the_engines_own_figures(checkpoints, capsys, no_reference):
    """The printed answer, steps and tokens/step are those of the engine request itself: the
    same config through the offline API commits the same tokens in the same steps."""
    from optimus.engine.llm import LLM
    from optimus.core.params import SamplingParams

    model = str(checkpoints["sdar"])
    assert main(["generate", "--model", model, "--prompt", "two plus two", "--max-tokens", "12",
                 "--device", "cpu", "--policy", "fixed:4"]) == 0
    out = capsys.readouterr().out
    stats = _stats_line(out, ENGINE_STATS)
    llm = LLM(model, device="cpu", policy="fixed:4")
    ids = llm.tokenizer.encode("two plus two", add_special_tokens=True)
    ref = llm.generate([ids], SamplingParams(max_tokens=12, seed=0))[0]
    assert out.splitlines()[0] == ref.text
    assert int(stats.group(2)) == len(ids) and int(stats.group(3)) == len(ref.token_ids)
    assert int(stats.group(4)) == ref.stats.steps and int(stats.group(6)) == ref.stats.tokens_committed
    assert stats.group(7) == ",".join(f"{c}x{n}" for c, n in sorted(ref.stats.chunk_sizes.items()))
    # fixed:4 over a 12-token answer: several steps, each committing at most 4 positions
    assert 3 <= ref.stats.steps and ref.stats.tokens_committed <= 4 * ref.stats.steps


def test_generate_defaults_to_the_elastic_policy(checkpoints, capsys, no_reference, monkeypatch, tmp_path):
    # The elastic policy's first-start latency profile, from a flat synthetic step time: what
    # this machine's load would make of real timings does not matter here.
    monkeypatch.setenv("OPTIMUS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("optimus.executor.timed_step.make_step_fn", lambda engine, **kw: lambda b, c: 0.01)
    assert main(["generate", "--model", str(checkpoints["llada"]), "--prompt", "hi", "--max-tokens", "6",
                 "--device", "cpu"]) == 0
    assert _stats_line(capsys.readouterr().out, ENGINE_STATS).group(1) == "elastic"


def test_same_seed_same_text_on_the_engine(checkpoints, capsys):
    args = ["generate", "--model", str(checkpoints["dream"]), "--prompt", "hi", "--temperature", "1.0",
            "--max-tokens", "6", "--seed", "5", "--policy", "fixed:2"]
    assert main(args) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[0] == first


# ---- the reference decoders -----------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(NATURAL))
def test_reference_runs_each_family_and_prints_stats(checkpoints, capsys, family):
    code = main(["generate", "--reference", "--model", str(checkpoints[family]), "--prompt", "hello world",
                 "--max-tokens", "8", "--device", "cpu", "--chat", "--temperature", "0.7", "--seed", "3"])
    out = capsys.readouterr().out
    assert code == 0
    stats = _stats_line(out)
    assert stats.group(1) == NATURAL[family]
    assert int(stats.group(3)) <= 8  # the answer never exceeds --max-tokens (canvases round up)
    assert int(stats.group(4)) >= 1 and int(stats.group(5)) >= 1
    assert float(stats.group(6)) == pytest.approx(int(stats.group(5)) / int(stats.group(4)), abs=0.01)


@pytest.mark.parametrize("algorithm", ["llada", "fast-dllm", "fast-dllm-prefix", "fast-dllm-dual"])
def test_llada_style_algorithms_and_knobs(checkpoints, capsys, algorithm):
    # --algorithm names a reference decoder: it implies --reference
    args = ["generate", "--model", str(checkpoints["llada"]), "--prompt", "two plus two",
            "--algorithm", algorithm, "--max-tokens", "8", "--block-length", "4", "--steps", "4"]
    if algorithm != "llada":
        args += ["--threshold", "0.5"]
    assert main(args) == 0
    stats = _stats_line(capsys.readouterr().out)
    assert stats.group(1) == algorithm and int(stats.group(5)) == 8


def test_same_seed_same_text_on_the_reference(checkpoints, capsys):
    args = ["generate", "--reference", "--model", str(checkpoints["dream"]), "--prompt", "hi",
            "--temperature", "1.0", "--max-tokens", "6", "--seed", "5"]
    assert main(args) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[0] == first


@pytest.mark.parametrize("extra, problem", [
    (["--max-tokens", "0"], "--max-tokens must be"),
    (["--threshold", "1.5"], "--threshold must be"),
    (["--temperature", "-1"], "--temperature must be"),
    (["--reference", "--steps", "0"], "--steps must be"),
    (["--steps", "4"], "add --reference"),
    (["--algorithm", "ar"], "needs a causal LM"),
    (["--algorithm", "sdar"], "needs a block-causal model"),
    (["--algorithm", "llada", "--threshold", "0.5"], "--threshold does not apply to llada"),
    (["--reference", "--steps", "3", "--max-tokens", "64"], "multiple of the number of blocks"),
    (["--dtype", "float8"], "unknown dtype"),
    (["--reference", "--dtype", "float8"], "unknown dtype"),
])
def test_bad_flags_print_one_line_and_exit_2(checkpoints, capsys, extra, problem):
    code = main(["generate", "--model", str(checkpoints["llada"]), "--prompt", "x", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and problem in err and err.startswith("optimus generate: error:")


def test_missing_model_dir_is_a_clear_error(tmp_path, capsys):
    for extra in ([], ["--reference"]):
        assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x", *extra]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "nope" in err
