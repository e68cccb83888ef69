"""Exact-match scoring of answers against held-out examples, and tau summaries."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from optimus_lab.evaluation.tasks import TASKS, Example


@dataclass(frozen=True)
class TaskScore:
    task: str
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def as_dict(self) -> dict:
        return {"accuracy": round(self.accuracy, 4), "correct": self.correct, "total": self.total}


def score(examples: Sequence[Example], answers: Sequence[str]) -> dict[str, TaskScore]:
    """Per-task exact match (after ``tasks.normalise``) of ``answers[i]`` against ``examples[i]``."""
    if len(examples) != len(answers):
        raise ValueError(f"{len(examples)} examples but {len(answers)} answers")
    correct, total = Counter(), Counter()
    for ex, ans in zip(examples, answers):
        total[ex.task] += 1
        correct[ex.task] += TASKS[ex.task].check(ans, ex)
    return {t: TaskScore(t, correct[t], total[t]) for t in total}


@dataclass(frozen=True)
class TauSummary:
    """Tokens committed per step: mean, histogram, and per chunk size (the acceptance profile)."""

    mean: float
    steps: int
    histogram: dict[int, int]  # tokens committed in a step -> how many steps
    per_chunk: dict[int, float]  # chunk size -> mean tokens committed per step at that size
    per_chunk_histogram: dict[int, dict[int, int]]

    def as_dict(self) -> dict:
        return {"mean": round(self.mean, 4), "steps": self.steps,
                "histogram": {str(k): v for k, v in sorted(self.histogram.items())},
                "per_chunk": {str(k): round(v, 4) for k, v in sorted(self.per_chunk.items())},
                "per_chunk_histogram": {str(c): {str(k): v for k, v in sorted(h.items())}
                                        for c, h in sorted(self.per_chunk_histogram.items())}}


def summarise_tau(steps: Sequence[tuple[int, int]]) -> TauSummary:
    """``steps``: one (chunk size, tokens committed) pair per decoding step of one request."""
    hist, per = Counter(), {}
    for chunk, n in steps:
        hist[n] += 1
        per.setdefault(chunk, Counter())[n] += 1
    total = sum(n for _, n in steps)
    mean_per = {c: sum(k * v for k, v in h.items()) / sum(h.values()) for c, h in per.items()}
    return TauSummary(total / len(steps) if steps else 0.0, len(steps), dict(hist), mean_per,
                      {c: dict(h) for c, h in per.items()})
