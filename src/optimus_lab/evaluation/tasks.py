"""Chat tasks with checkable answers: the instruction half of the training data and the
held-out sets of ``optimus eval``.

Every example has a *key* (the task's free variables, e.g. the operands). A key is held out
iff a hash of it falls in the held-out bucket, so training (``split="train"``) and evaluation
(``split="heldout"``) never share an example, whatever the seeds.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable

HELDOUT_PERCENT = 2  # share of each task's key space reserved for evaluation

_WORDS = ("apple", "river", "stone", "cloud", "tiger", "lamp", "garden", "pencil", "orange",
          "window", "horse", "bread", "candle", "forest", "music", "paper", "silver", "train",
          "winter", "yellow", "bridge", "castle", "dragon", "flower", "honey", "island", "jacket",
          "kettle", "ladder", "mirror", "needle", "ocean", "pillow", "rabbit", "sugar", "tomato")


@dataclass(frozen=True)
class Example:
    task: str
    key: tuple
    question: str
    answer: str


def normalise(text: str) -> str:
    """Whitespace-collapsed, trailing punctuation stripped: the form exact match compares."""
    return " ".join(text.split()).rstrip(".!").strip()


def is_heldout(task: str, key: tuple) -> bool:
    digest = hashlib.blake2b(repr((task, key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 100 < HELDOUT_PERCENT


Maker = Callable[[random.Random], tuple[tuple, str, str]]  # rng -> (key, question, answer)


@dataclass(frozen=True)
class Task:
    name: str
    make: Maker
    scored: bool = True  # False: chat data for fluency, not part of the accuracy harness

    def sample(self, rng: random.Random, split: str) -> Example:
        want_heldout = split == "heldout"
        while True:
            key, q, a = self.make(rng)
            if is_heldout(self.name, key) == want_heldout:
                return Example(self.name, key, q, a)

    def check(self, answer: str, example: Example) -> bool:
        return normalise(answer) == normalise(example.answer)


def _pick(rng: random.Random, templates: tuple[str, ...], **kw) -> str:
    return rng.choice(templates).format(**kw)


_ADD_Q = ("What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}.", "{a} + {b} = ?",
          "What is the sum of {a} and {b}?")
_SUB_Q = ("What is {a} - {b}?", "Compute {a} - {b}.", "Subtract {b} from {a}.", "{a} - {b} = ?",
          "What is {a} minus {b}?")


def _add(lo: int, hi: int) -> Maker:
    def make(rng):
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        return (a, b), _pick(rng, _ADD_Q, a=a, b=b), str(a + b)
    return make


def _sub(lo: int, hi: int) -> Maker:
    def make(rng):
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        a, b = max(a, b), min(a, b)
        return (a, b), _pick(rng, _SUB_Q, a=a, b=b), str(a - b)
    return make


def _mixed_arith(rng):
    digits = rng.choice((1, 2, 2, 4))
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits - 1
    if rng.random() < 0.25:
        a, b = rng.randint(2, 99), rng.randint(2, 9)
        return ("mul", a, b), f"What is {a} * {b}?", str(a * b)
    maker = _add(lo, hi) if rng.random() < 0.5 else _sub(lo, hi)
    key, q, a = maker(rng)
    return (digits,) + key, q, a


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return [rng.choice(_WORDS) for _ in range(rng.randint(lo, hi))]


def _count(rng):
    words = _words(rng, 2, 9)
    q = _pick(rng, ("How many words are in this list: {w}?", "Count the words: {w}."), w=", ".join(words))
    return tuple(words), q, f"There are {len(words)} words."


def _sort(rng):
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    q = _pick(rng, ("Sort these numbers from smallest to largest: {n}", "Sort in ascending order: {n}"),
              n=" ".join(map(str, nums)))
    return tuple(nums), q, " ".join(map(str, sorted(nums)))


def _copy(rng):
    words = _words(rng, 3, 8)
    q = _pick(rng, ("Repeat exactly: {w}", "Copy this text: {w}"), w=" ".join(words))
    return tuple(words), q, " ".join(words)


def _reverse(rng):
    words = _words(rng, 2, 6)
    q = _pick(rng, ("Reverse the order of these words: {w}", "Say these words backwards: {w}"),
              w=" ".join(words))
    return tuple(words), q, " ".join(reversed(words))


def _successor(rng):
    n = rng.randint(0, 9998)
    q = _pick(rng, ("What number comes after {n}?", "What is the next number after {n}?"), n=n)
    return (n,), q, f"The number after {n} is {n + 1}."


def _compare(rng):
    a, b = rng.sample(range(1000), 2)
    q = _pick(rng, ("Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?"), a=a, b=b)
    return (a, b), q, f"{max(a, b)} is larger."


_GREETINGS = (
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi", "Hi! What can I do for you?"),
    ("Who are you?", "I am Optimus, a small diffusion language model."),
    ("What can you do?", "I can add and subtract numbers, count, sort, copy and reverse words, "
                         "and tell you what a word means."),
    ("Thank you!", "You are welcome."),
    ("How are you?", "I am well, thank you. How can I help?"),
    ("Goodbye", "Goodbye! Have a nice day."),
    ("What is your name?", "My name is Optimus."),
)


def _greeting(rng):
    q, a = rng.choice(_GREETINGS)
    return (q, rng.randint(0, 10 ** 6)), q, a  # salted key: greetings appear in both splits


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("add3", _add(100, 999)),
    Task("sub3", _sub(100, 999)),
    Task("arith", _mixed_arith),
    Task("count", _count),
    Task("sort", _sort),
    Task("copy", _copy),
    Task("reverse", _reverse),
    Task("successor", _successor),
    Task("compare", _compare),
    Task("greeting", _greeting, scored=False),
)}

SCORED_TASKS = tuple(name for name, t in TASKS.items() if t.scored)


def heldout_set(task: str, n: int, seed: int = 1234) -> list[Example]:
    """The first ``n`` held-out examples of ``task`` for ``seed``: deterministic, de-duplicated."""
    rng, seen, out = random.Random(f"{task}:{seed}"), set(), []
    while len(out) < n:
        ex = TASKS[task].sample(rng, "heldout")
        if ex.key not in seen:
            seen.add(ex.key)
            out.append(ex)
    return out
