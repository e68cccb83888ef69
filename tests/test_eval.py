"""The accuracy harness: held-out sets are disjoint from training, scoring tells good from bad."""

from __future__ import annotations

import random

import pytest

from optimus_lab.evaluation.scoring import score, summarise_tau
from optimus_lab.evaluation.tasks import SCORED_TASKS, TASKS, heldout_set, is_heldout, normalise


@pytest.mark.parametrize("task", SCORED_TASKS)
def test_known_good_and_bad_answers(task):
    examples = heldout_set(task, 20)
    good = score(examples, [ex.answer + "." for ex in examples])  # trailing period is tolerated
    assert good[task].correct == 20 and good[task].accuracy == 1.0
    wrong = [ex.answer + " 1" for ex in examples]  # one extra token: not an exact match
    assert score(examples, wrong)[task].correct == 0
    half = [ex.answer if i % 2 else "" for i, ex in enumerate(examples)]
    assert score(examples, half)[task].correct == 10


def test_arithmetic_answers_are_the_true_results():
    for ex in heldout_set("add3", 50):
        a, b = ex.key
        assert ex.answer == str(a + b) and str(a) in ex.question and str(b) in ex.question
    for ex in heldout_set("sub3", 50):
        a, b = ex.key
        assert ex.answer == str(a - b) and a >= b


@pytest.mark.parametrize("task", SCORED_TASKS)
def test_training_split_never_yields_heldout_examples(task):
    heldout = {ex.key for ex in heldout_set(task, 50)}
    rng = random.Random(7)
    train = [TASKS[task].sample(rng, "train") for _ in range(3000)]
    assert not heldout & {ex.key for ex in train}
    assert all(not is_heldout(task, ex.key) for ex in train)


def test_heldout_sets_are_deterministic_and_unique():
    a, b = heldout_set("add3", 100), heldout_set("add3", 100)
    assert a == b and len({ex.key for ex in a}) == 100


def test_normalise():
    assert normalise("  1 2   3. ") == "1 2 3" and normalise("936") != normalise("963")


def test_tau_summary():
    s = summarise_tau([(4, 1), (4, 3), (32, 8), (32, 8)])
    assert s.mean == 5.0 and s.steps == 4
    assert s.per_chunk == {4: 2.0, 32: 8.0} and s.histogram == {1: 1, 3: 1, 8: 2}
    with pytest.raises(ValueError):
        score(heldout_set("copy", 2), ["x"])
