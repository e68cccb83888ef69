"""Local data for the lm-eval tasks in this directory (read next to this file, whatever the
working directory): a few dozen two-digit additions and subtractions, asked in the ChatML turn
format the shipped model was trained on."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent
END_OF_TURN = "<|im_end|>"


def _load(name: str, **_: object) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_arith_gen(**kwargs: object) -> datasets.DatasetDict:
    return _load("arith_gen.jsonl", **kwargs)


def load_arith_mc(**kwargs: object) -> datasets.DatasetDict:
    return _load("arith_mc.jsonl", **kwargs)


def choices(doc: dict) -> list[str]:
    """Each answer as a whole assistant turn, so a choice that is a prefix of another (8, 80)
    does not win by stopping early."""
    return [c + END_OF_TURN for c in doc["choices"]]
