"""Write the arithmetic third of ``chat300.jsonl`` (the chat suite of ``optimus eval``).

The 100 arithmetic prompts come from a seeded generator, so they can be rebuilt and checked;
the 100 factual and 100 prose prompts were written by hand and live only in the JSONL, where
this script keeps them as they are (after the arithmetic rows, in their order).

  python scripts/data/make_chat300.py            # rewrite the arithmetic rows
  python scripts/data/make_chat300.py --check    # exit 1 if the committed rows differ
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "src/optimus_lab/evaluation/data/chat300.jsonl"
SEED = 300
COUNT = 100

# Bare sums and story problems: a small instruct model should read the plain forms and the
# word problems alike. Every template names its operands in the order a, b.
_ADD = (
    "What is {a} + {b}?", "Compute {a} + {b}.", "What is {a} plus {b}?", "Add {a} and {b}.",
    "What do you get when you add {a} and {b}?", "Calculate the sum of {a} and {b}.",
    "Sara has {a} stickers and her friend gives her {b} more. How many stickers does she have now?",
    "One shelf holds {a} books and another holds {b} books. How many books are there in total?",
    "A farmer picked {a} apples in the morning and {b} apples in the afternoon. How many apples did he pick?",
    "Tom walked {a} minutes on Monday and {b} minutes on Tuesday. How many minutes did he walk altogether?",
)
_SUB = (
    "What is {a} - {b}?", "Compute {a} - {b}.", "What is {a} minus {b}?", "Subtract {b} from {a}.",
    "What is the difference between {a} and {b}?",
    "I had {a} marbles and gave away {b}. How many marbles do I have left?",
    "A bus carries {a} people and {b} of them get off. How many people are still on the bus?",
    "A baker made {a} cookies and sold {b}. How many cookies are left?",
    "There are {a} pages in a book and Maya has read {b} of them. How many pages does she have left to read?",
)
_MUL = (
    "What is {a} * {b}?", "What is {a} times {b}?", "Multiply {a} by {b}.", "Compute {a} x {b}.",
    "What is the product of {a} and {b}?",
    "If I have {a} boxes with {b} apples each, how many apples do I have?",
    "There are {a} rows of chairs with {b} chairs in each row. How many chairs are there?",
    "A pack holds {b} pencils. How many pencils are in {a} packs?",
    "Each ticket costs {b} dollars. How much do {a} tickets cost, in dollars?",
)


# A 135M instruct model gets few sums with a carry right, so two in three draws are the kind
# it can do (no carry, no borrow, times tables) and the rest keep the suite from saturating.
EASY_SHARE = 2 / 3


def _add(rng: random.Random) -> tuple[int, int, int, tuple[str, ...]]:
    easy = rng.random() < EASY_SHARE
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if not easy or (a % 10 + b % 10 < 10 and a + b < 100):
            return a, b, a + b, _ADD


def _sub(rng: random.Random) -> tuple[int, int, int, tuple[str, ...]]:
    easy = rng.random() < EASY_SHARE
    while True:
        a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
        if not easy or a % 10 >= b % 10:
            return a, b, a - b, _SUB


def _mul(rng: random.Random) -> tuple[int, int, int, tuple[str, ...]]:
    a = rng.randint(2, 9)
    b = rng.randint(2, 9) if rng.random() < EASY_SHARE else rng.choice((10, 11, 12, 20, 30, 40, 50))
    return a, b, a * b, _MUL


def _numbers(text: str) -> set[str]:
    return set(re.findall(r"\d+", text))


def arithmetic_rows(seed: int = SEED, count: int = COUNT) -> list[dict]:
    """``count`` arithmetic rows, addition, subtraction and multiplication in turn. A draw is
    redrawn when its result is already a number of the prompt (an answer that only echoes
    the question must not pass), has one digit (a "1." or "Step 2" in any answer would
    match it) or repeats a prompt."""
    rng, rows, seen = random.Random(seed), [], set()
    makers = (_add, _sub, _mul)
    while len(rows) < count:
        a, b, result, templates = makers[len(rows) % 3](rng)
        prompt = rng.choice(templates).format(a=a, b=b)
        if result < 10 or str(result) in _numbers(prompt) or prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"id": f"arith-{len(rows) + 1:03d}", "kind": "arithmetic", "prompt": prompt,
                     "answers": [str(result)]})
    return rows


def _line(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False)


def rebuilt(path: Path = DATA) -> list[str]:
    """The file's lines with the arithmetic rows regenerated and the others kept."""
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["kind"] != "arithmetic"]
    return [_line(r) for r in arithmetic_rows()] + kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed file differs")
    args = parser.parse_args(argv)
    lines = rebuilt()
    if args.check:
        same = DATA.read_text().splitlines() == lines
        print("chat300.jsonl is up to date" if same else "chat300.jsonl differs from the generator")
        return 0 if same else 1
    DATA.write_text("\n".join(lines) + "\n")
    print(f"wrote {DATA} ({len(lines)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
