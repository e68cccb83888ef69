"""The instruction mixture: checkable tasks from ``optimus_lab.evaluation.tasks`` (training split
only) plus fluency chat built from the text sources (word definitions, sayings)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from optimus_lab.evaluation.tasks import TASKS, Example
from optimus_lab.train import corpus

# Examples per task at scale 1.0; arithmetic dominates because it is the accuracy target.
MIXTURE: dict[str, int] = {
    "add3": 300_000, "sub3": 300_000, "arith": 80_000, "count": 25_000, "sort": 25_000,
    "copy": 25_000, "reverse": 25_000, "successor": 25_000, "compare": 25_000, "greeting": 5_000,
    "define": 40_000, "saying": 10_000,
}


@dataclass(frozen=True)
class ChatPair:
    question: str
    answer: str


def _definitions(extracted: Path) -> list[tuple[str, str, str]]:
    out = []
    for src in (s for s in corpus.SOURCES if s.name == "wordnet"):
        for doc in src.read(extracted):
            for line in doc.splitlines():
                word, _, gloss = line.partition(": ")
                w, _, pos = word.rpartition(" (")
                gloss = gloss.split(";")[0].strip()
                if w and gloss and len(gloss) < 160:
                    out.append((w, pos.rstrip(")"), gloss))
    return out


def _sayings(extracted: Path) -> list[str]:
    src = next(s for s in corpus.SOURCES if s.name == "fortunes")
    return [corpus.clean(t) for t in src.read(extracted) if 20 < len(t) < 240]


_DEFINE_Q = ("What does the word \"{w}\" mean?", "Define {w}.", "What is the meaning of \"{w}\"?")
_SAYING_Q = ("Tell me a saying.", "Tell me something wise.", "Give me a quote.", "Say something funny.")


def chat_pairs(extracted: Path | None, scale: float, seed: int) -> Iterator[ChatPair]:
    rng = random.Random(seed)
    defs = _definitions(extracted) if extracted else []
    sayings = _sayings(extracted) if extracted else []
    for name, count in MIXTURE.items():
        n = max(1, int(count * scale))
        if name == "define":
            for w, pos, gloss in (rng.choice(defs) for _ in range(n if defs else 0)):
                yield ChatPair(rng.choice(_DEFINE_Q).format(w=w), f"\"{w}\" ({pos}) means {gloss}.")
        elif name == "saying":
            for text in (rng.choice(sayings) for _ in range(n if sayings else 0)):
                yield ChatPair(rng.choice(_SAYING_Q), text)
        else:
            for _ in range(n):
                ex: Example = TASKS[name].sample(rng, "train")
                yield ChatPair(ex.question, ex.answer)
