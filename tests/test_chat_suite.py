"""The chat suite: the committed prompt set, its checks, the answer statistics, the run and the CLI."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch

from optimus_lab.evaluation.chat_suite import (
    CHECKED, KINDS, ChatExample, answer_nll, check, format_table, load_chat300, repeated_ngram_rate,
    run_chat_eval,
)

ROOT = Path(__file__).resolve().parents[1]
DLLM, AR = "random-tiny:sdar-8b", "random-tiny:llama-8b"


def _generator():
    spec = importlib.util.spec_from_file_location("make_chat300", ROOT / "scripts/data/make_chat300.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _right(ex: ChatExample) -> str:
    words = list(ex.answers[:1]) + [group[0] for group in ex.all_of]
    return "The answer is " + ", ".join(words) + "."


# ---------------------------------------------------------------- the set and its checks

def test_the_set_has_100_of_each_kind_with_unique_ids():
    examples = load_chat300()
    assert [sum(e.kind == k for e in examples) for k in KINDS] == [100, 100, 100]
    assert len({e.id for e in examples}) == 300 and len({e.prompt for e in examples}) == 300
    assert all(not e.answers and not e.all_of for e in examples if e.kind == "prose")
    assert [e.kind for e in load_chat300(limit_per_kind=2)] == ["arithmetic"] * 2 + ["factual"] * 2 + ["prose"] * 2
    assert {e.kind for e in load_chat300(kinds=["factual"])} == {"factual"}


def test_every_checkable_example_passes_its_own_answer():
    for ex in load_chat300(kinds=CHECKED):
        assert check(ex, _right(ex)), ex.id


def test_an_answer_that_only_echoes_the_question_fails():
    for ex in load_chat300(kinds=CHECKED):
        assert not check(ex, ex.prompt), ex.id


def test_the_arithmetic_rows_are_the_generators_and_the_true_results():
    committed = [json.loads(line) for line in (ROOT / "src/optimus_lab/evaluation/data/chat300.jsonl")
                 .read_text().splitlines()][:100]
    assert committed == _generator().arithmetic_rows()
    for row in committed:
        a, b = (int(x) for x in re.findall(r"\d+", row["prompt"]))
        assert int(row["answers"][0]) in {a + b, a - b, b - a, a * b} and int(row["answers"][0]) > 0


def test_wrong_numbers_and_words_fail():
    arith = ChatExample("a", "arithmetic", "What is 47 + 38?", ("85",))
    for good in ("85", "47 + 38 = 85.", "The answer is 85!", "(85)", "$85", "85.0", "It is 85, I think"):
        assert check(arith, good), good
    for bad in ("86", "850", "185", "8.5", "85.5", "x85", "-85", "eighty-five", ""):
        assert not check(arith, bad), bad
    assert check(ChatExample("b", "arithmetic", "q", ("1085",)), "That makes 1,085 in all.")
    freezing = ChatExample("g", "factual", "q", ("0", "zero"))
    assert check(freezing, "It freezes at 0°C.") and check(freezing, "At zero degrees.")
    assert not check(freezing, "It freezes at -18.0°C.") and not check(freezing, "At 10 degrees.")
    fact = ChatExample("c", "factual", "What is the capital of France?", ("Paris",))
    assert check(fact, "The capital of France is PARIS.") and not check(fact, "It is Lyon.")
    assert not check(fact, "Parisian food")  # whole words only
    two_words = ChatExample("d", "factual", "q", ("blue whale",))
    assert check(two_words, "the Blue\nwhale") and not check(two_words, "a whale")
    listed = ChatExample("e", "factual", "q", (), (("red",), ("blue",), ("yellow", "green")))
    assert check(listed, "Red, blue and yellow.") and check(listed, "red, green, blue")
    assert not check(listed, "red and blue") and not check(listed, "red, orange, purple")
    with pytest.raises(ValueError):
        check(ChatExample("f", "prose", "q"), "anything")


# ---------------------------------------------------------------- statistics

@pytest.mark.parametrize("ids, n, rate", [
    ([], 4, 0.0), ([1, 2, 3], 4, 0.0), ([1, 2, 3, 4], 4, 0.0), ([1, 2, 3, 4, 5, 6], 4, 0.0),
    ([1, 2, 3, 4, 1, 2, 3, 4], 4, 1 / 5),  # 1234 2341 3412 4123 1234
    ([7] * 6, 4, 2 / 3),  # three equal 4-grams: the last two repeat the first
    ([1, 2, 1, 2, 1], 2, 2 / 4),  # 12 21 12 21
    ([5, 5, 5], 1, 2 / 3),
])
def test_repeated_ngram_rate(ids, n, rate):
    assert repeated_ngram_rate(ids, n) == pytest.approx(rate)


@pytest.fixture(scope="module")
def models():
    from optimus.models.loader import load_model
    return load_model(DLLM, device="cpu", progress=False), load_model(AR, device="cpu", progress=False)


def _hand_nll(loaded, prompt: list[int], answer: list[int]) -> float:
    """Plain causal forward over prompt + answer, log-softmax, the answer tokens' mean."""
    from optimus.models.dense import DenseBackend, attention_mask
    ids = torch.tensor(prompt + answer)
    pos = torch.arange(len(ids))
    mask = attention_mask(loaded.spec.attention, pos[None], pos[None])
    with torch.no_grad():
        hidden = loaded.model(ids, pos, DenseBackend(1, len(ids), mask))
        logp = loaded.model.logits(hidden).float().log_softmax(-1)
    reads = logp[len(prompt) - 1:-1]
    return -reads.gather(1, torch.tensor(answer)[:, None]).mean().item()


def test_answer_nll_is_the_mean_answer_token_nll_of_a_plain_forward(models):
    _, ar = models
    tok = ar.tokenizer
    prompts = [tok.encode("What is the capital of France?"), tok.encode("Hi"), tok.encode("Tell me a story.")]
    answers = [tok.encode(" Paris is the capital."), tok.encode(" Hello there, how are you today?"), []]
    got = answer_nll(ar, prompts, answers, batch=2)  # two of different lengths share a padded forward
    for p, a, value in zip(prompts[:2], answers[:2], got):
        assert value == pytest.approx(_hand_nll(ar, p, a), abs=1e-4)
    assert math.isnan(got[2])
    assert answer_nll(ar, prompts[1:2], answers[1:2], batch=1) == pytest.approx(got[1:2], abs=1e-5)


def test_answer_nll_refuses_a_diffusion_model(models):
    dllm, _ = models
    with pytest.raises(ValueError, match="causal"):
        answer_nll(dllm, [[1, 2]], [[3]])


# ---------------------------------------------------------------- the run and the table

def test_run_chat_eval_end_to_end(models):
    dllm, ar = models
    lines: list[str] = []
    result = run_chat_eval(dllm, ar, ["ar", "fixed:4"], max_tokens=8, limit_per_kind=2, log=lines.append)
    assert result["counts"] == {"arithmetic": 2, "factual": 2, "prose": 2} and len(lines) == 2
    for name, model in (("ar", "ar"), ("fixed:4", "dllm")):
        row = result["configs"][name]
        assert row["model"] == model and set(row["accuracy"]) == set(CHECKED)
        assert all(0.0 <= v <= 1.0 for v in row["accuracy"].values())
        assert row["prose"]["nll"] > 0 and 0 <= row["prose"]["rep4"] <= 1 and 0 < row["prose"]["length"]
        assert row["tau"]["mean"] >= 1.0 and row["seconds"] >= 0
        assert all(len(row["samples"][k]) == 2 for k in KINDS)
        assert set(row["vs_ar"]) == {"nll_ratio", "rep4_ratio", "length_ratio", "arithmetic_points",
                                     "factual_points"}
    ar_vs = result["configs"]["ar"]["vs_ar"]
    assert ar_vs["nll_ratio"] == 1.0 and ar_vs["arithmetic_points"] == 0.0
    assert result["configs"]["ar"]["tau"]["mean"] == 1.0
    json.dumps(result, allow_nan=False)  # a strict JSON file: no NaN anywhere
    table = format_table(result).splitlines()
    assert len(table) == 4 and table[2].startswith("| ar |") and table[3].startswith("| fixed:4 |")
    assert len({line.count("|") for line in table}) == 1


def test_format_table_without_an_ar_row():
    row = {"model": "dllm", "accuracy": {"arithmetic": 0.5, "factual": None},
           "prose": {"nll": 2.0, "rep4": 0.1, "length": 40.0}, "tau": {"mean": 3.25}, "seconds": 1, "vs_ar": None}
    table = format_table({"configs": {"elastic": row}}).splitlines()
    assert len(table) == 3 and table[2].startswith("| elastic | dllm | 0.500 | - | 2.000 | - |")


# ---------------------------------------------------------------- the command

def test_cli_chat_suite(tmp_path, capsys):
    from optimus.cli import main
    out = tmp_path / "chat.json"
    rc = main(["eval", "--suite", "chat", "--model", DLLM, "--base", AR, "--configs", "ar,fixed:4",
               "--limit", "1", "--max-tokens", "4", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| config |" in printed and "| fixed:4 | dllm |" in printed
    result = json.loads(out.read_text())
    assert list(result["configs"]) == ["ar", "fixed:4"] and result["counts"]["prose"] == 1
    assert result["max_tokens"] == 4 and result["ar"] == AR


def test_cli_defaults_per_suite():
    from optimus.cli import build_parser
    from optimus.commands.eval import _configs
    from optimus_lab.evaluation.chat_suite import CHAT_CONFIGS
    args = build_parser(["eval"]).parse_args(["eval"])
    assert args.suite == "tasks" and args.configs is None and args.base == "smollm2-135m"
    assert CHAT_CONFIGS == ("ar", "fixed:32", "elastic") and _configs("ar,,elastic", CHAT_CONFIGS) == ("ar", "elastic")
