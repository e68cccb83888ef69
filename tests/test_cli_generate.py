"""``optimus generate`` on a tiny random checkpoint of every family (CPU)."""

from __future__ import annotations

import re

import pytest

from optimus.cli import main
from fixtures import FAMILIES, make_tiny_checkpoint

STATS = re.compile(r"^\[(\w[\w-]*)\] prompt=(\d+) answer=(\d+) steps=(\d+) tokens=(\d+) "
                   r"tokens/step=([\d.]+) wall=([\d.]+)s$")
NATURAL = {"llada": "llada", "dream": "dream", "sdar": "sdar", "llama": "ar", "qwen2": "ar", "qwen3": "ar"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ckpt")
    return {family: make_tiny_checkpoint(root / family, family) for family in FAMILIES}


def _stats_line(out: str) -> re.Match:
    match = STATS.match(out.strip().splitlines()[-1])
    assert match, out
    return match


@pytest.mark.parametrize("family", sorted(NATURAL))
def test_generate_runs_each_family_and_prints_stats(checkpoints, capsys, family):
    for extra in ([], ["--chat", "--temperature", "0.7", "--seed", "3"]):
        code = main(["generate", "--model", str(checkpoints[family]), "--prompt", "hello world",
                     "--max-tokens", "8", "--device", "cpu", *extra])
        out = capsys.readouterr().out
        assert code == 0
        stats = _stats_line(out)
        assert stats.group(1) == NATURAL[family]
        assert int(stats.group(3)) <= 8  # the answer never exceeds --max-tokens (canvases round up)
        assert int(stats.group(4)) >= 1 and int(stats.group(5)) >= 1
        assert float(stats.group(6)) == pytest.approx(int(stats.group(5)) / int(stats.group(4)), abs=0.01)


@pytest.mark.parametrize("algorithm", ["llada", "fast-dllm", "fast-dllm-prefix", "fast-dllm-dual"])
def test_llada_style_algorithms_and_knobs(checkpoints, capsys, algorithm):
    args = ["generate", "--model", str(checkpoints["llada"]), "--prompt", "two plus two",
            "--algorithm", algorithm, "--max-tokens", "8", "--block-length", "4", "--steps", "4"]
    if algorithm != "llada":
        args += ["--threshold", "0.5"]
    assert main(args) == 0
    stats = _stats_line(capsys.readouterr().out)
    assert stats.group(1) == algorithm and int(stats.group(5)) == 8


def test_same_seed_same_text(checkpoints, capsys):
    args = ["generate", "--model", str(checkpoints["dream"]), "--prompt", "hi", "--temperature", "1.0",
            "--max-tokens", "6", "--seed", "5"]
    assert main(args) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[0] == first


@pytest.mark.parametrize("extra, problem", [
    (["--max-tokens", "0"], "--max-tokens must be"),
    (["--threshold", "1.5"], "--threshold must be"),
    (["--temperature", "-1"], "--temperature must be"),
    (["--steps", "0"], "--steps must be"),
    (["--algorithm", "ar"], "needs a causal LM"),
    (["--algorithm", "sdar"], "needs a block-causal model"),
    (["--algorithm", "llada", "--threshold", "0.5"], "--threshold does not apply to llada"),
    (["--steps", "3", "--max-tokens", "64"], "multiple of the number of blocks"),
    (["--dtype", "float8"], "unknown dtype"),
])
def test_bad_flags_print_one_line_and_exit_2(checkpoints, capsys, extra, problem):
    code = main(["generate", "--model", str(checkpoints["llada"]), "--prompt", "x", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and problem in err and err.startswith("optimus generate: error:")


def test_missing_model_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "nope" in err
