"""Benchmark prompts: each dataset yields :class:`SampleRequest` (prompt text, its token count,
the output length to ask for).

- ``random``: prompts of random token ids (decoded to text), lengths uniform in
  ``[len * (1 - range_ratio), len * (1 + range_ratio)]``.
- ``sharegpt-like``: lengths drawn from log-normal fits whose means are the ShareGPT statistics
  published with vLLM (Kwon et al., SOSP 2023, section 6.1 and figure 11: mean input 161.31
  tokens, mean output 337.99); ``SHAREGPT_SIGMA`` sets their spread (see docs/benchmarks.md).
  Nothing is downloaded; the prompt text is random tokens as in ``random``.
- ``text``: passages of the project's own training text (``data_cache/extracted``, written by
  ``scripts/data/fetch.sh``), else a few built-in public-domain lines.
- ``tasks``: held-out questions of the project's checkable chat tasks
  (:mod:`optimus_lab.evaluation.tasks`, the default model's instruction data), round-robin over the
  tasks; meant for ``--endpoint /v1/chat/completions``.
- ``mixed``: half ``text`` passages, half ``tasks`` questions already rendered with the
  tokenizer's chat template, shuffled, for ``/v1/completions``: a load in which some requests
  are confident answers and others hesitant prose (what per-request chunk sizes are for).
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Protocol, Sequence

DATASETS = ("random", "sharegpt-like", "text", "tasks", "mixed")

# Means published for ShareGPT (vLLM paper, fig. 11); sigmas are our choice of spread
# (log-space standard deviation), giving medians of about 0.6x (input) and 0.7x (output) the mean.
SHAREGPT_MEAN = {"input": 161.31, "output": 337.99}
SHAREGPT_SIGMA = {"input": 1.0, "output": 0.8}
# Length bounds of vLLM's ShareGPT filter: drop prompts or outputs under 4 tokens, prompts over 1024.
SHAREGPT_MIN, SHAREGPT_MAX_INPUT = 4, 1024

# Fallback for the text dataset when the project's data cache is absent (public domain).
BUILTIN_LINES = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness.",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
    "I thought I would sail about a little and see the watery part of the world.",
    "Four score and seven years ago our fathers brought forth on this continent a new nation, conceived in "
    "liberty, and dedicated to the proposition that all men are created equal.",
    "All the world's a stage, and all the men and women merely players; they have their exits and their "
    "entrances, and one man in his time plays many parts.",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife.",
    "Happy families are all alike; every unhappy family is unhappy in its own way.",
)


class TokenCounter(Protocol):
    """The part of a tokenizer the datasets need (``optimus.models.tokenizer.Tokenizer`` fits)."""

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def all_special_ids(self) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class SampleRequest:
    prompt: str
    prompt_len: int  # tokens of ``prompt`` under the benchmark's tokenizer
    expected_output_len: int  # max_tokens asked for


@dataclass(frozen=True)
class DatasetSpec:
    name: str = "random"
    num_prompts: int = 100
    input_len: int = 128
    output_len: int = 128
    range_ratio: float = 0.0  # random: relative spread of lengths around input_len/output_len
    length_scale: float = 1.0  # sharegpt-like: multiply both lengths (e.g. 0.25 for CPU runs)
    text_dir: str = "data_cache/extracted"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.name!r}")
        if self.num_prompts < 1 or self.input_len < 1 or self.output_len < 1:
            raise ValueError("num_prompts, input_len and output_len must be >= 1")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        if self.length_scale <= 0:
            raise ValueError(f"length_scale must be > 0, got {self.length_scale}")


def sample_requests(spec: DatasetSpec, tokenizer: TokenCounter) -> list[SampleRequest]:
    rng = random.Random(spec.seed)
    if spec.name == "random":
        lens = [(_spread(rng, spec.input_len, spec.range_ratio), _spread(rng, spec.output_len, spec.range_ratio))
                for _ in range(spec.num_prompts)]
        return [_random_prompt(rng, tokenizer, i, o) for i, o in lens]
    if spec.name == "sharegpt-like":
        return [_random_prompt(rng, tokenizer, *sharegpt_lengths(rng, spec.length_scale))
                for _ in range(spec.num_prompts)]
    if spec.name == "tasks":
        return _task_requests(spec, tokenizer, rng)
    if spec.name == "mixed":
        return _mixed_requests(spec, tokenizer, rng)
    return _text_requests(spec, tokenizer, rng)


def sharegpt_lengths(rng: random.Random, scale: float = 1.0) -> tuple[int, int]:
    """(input, output) lengths from the log-normal fits, clipped to vLLM's ShareGPT filter."""
    def draw(kind: str) -> int:
        sigma = SHAREGPT_SIGMA[kind]
        mu = math.log(SHAREGPT_MEAN[kind]) - sigma * sigma / 2  # so that E[exp(N(mu, sigma))] = mean
        return round(rng.lognormvariate(mu, sigma) * scale)

    lo = max(1, round(SHAREGPT_MIN * scale))
    return (min(max(draw("input"), lo), round(SHAREGPT_MAX_INPUT * scale)), max(draw("output"), lo))


def _spread(rng: random.Random, n: int, ratio: float) -> int:
    return max(1, rng.randint(math.floor(n * (1 - ratio)), math.ceil(n * (1 + ratio))))


def _random_prompt(rng: random.Random, tok: TokenCounter, input_len: int, output_len: int) -> SampleRequest:
    special = set(tok.all_special_ids)
    pool = [i for i in range(tok.vocab_size) if i not in special]
    ids = [rng.choice(pool) for _ in range(input_len)]
    # decode/encode is not a bijection: re-encode once and cut back to at most input_len tokens
    text = tok.decode(ids)
    reencoded = tok.encode(text)
    if len(reencoded) > input_len:
        text = tok.decode(reencoded[:input_len])
    return SampleRequest(text, len(tok.encode(text)), output_len)


def _text_requests(spec: DatasetSpec, tok: TokenCounter, rng: random.Random) -> list[SampleRequest]:
    """Consecutive passages of about ``input_len`` tokens, cycling if the text runs out."""
    passages: list[str] = []
    for doc in _documents(Path(spec.text_dir)):
        ids = tok.encode(doc)
        for start in range(0, max(1, len(ids) - spec.input_len // 2), spec.input_len):
            passages.append(tok.decode(ids[start:start + spec.input_len]))
            if len(passages) >= 4 * spec.num_prompts:
                break
        if len(passages) >= 4 * spec.num_prompts:
            break
    rng.shuffle(passages)
    picks = [passages[i % len(passages)] for i in range(spec.num_prompts)]
    return [SampleRequest(p, len(tok.encode(p)), spec.output_len) for p in picks]


def _task_requests(spec: DatasetSpec, tok: TokenCounter, rng: random.Random) -> list[SampleRequest]:
    from optimus_lab.evaluation.tasks import TASKS

    names = sorted(TASKS)
    questions = [TASKS[names[i % len(names)]].sample(rng, "heldout").question for i in range(spec.num_prompts)]
    return [SampleRequest(q, len(tok.encode(q)), spec.output_len) for q in questions]


def _mixed_requests(spec: DatasetSpec, tok: TokenCounter, rng: random.Random) -> list[SampleRequest]:
    if not hasattr(tok, "apply_chat_template"):
        raise ValueError("the mixed dataset renders task questions with a chat template: "
                         "the tokenizer has none")
    text = _text_requests(replace(spec, num_prompts=(spec.num_prompts + 1) // 2), tok, rng)
    tasks = _task_requests(replace(spec, num_prompts=spec.num_prompts - len(text)), tok, rng)
    chats = [tok.apply_chat_template([{"role": "user", "content": r.prompt}]) for r in tasks]
    out = text + [SampleRequest(p, len(tok.encode(p)), spec.output_len) for p in chats]
    rng.shuffle(out)
    return out


def _documents(text_dir: Path) -> Iterator[str]:
    if text_dir.is_dir():
        from optimus_lab.train.corpus import documents  # the training mixture's readers and cleaning
        found = False
        for _, doc in documents(text_dir, scale=0.01):
            found = True
            yield doc
        if found:
            return
    yield from BUILTIN_LINES


# ---- command-line arguments shared by `bench serve` and `bench sweep` -------------------
def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("dataset")
    g.add_argument("--dataset", choices=DATASETS, default="random", help="prompt source (default: random)")
    g.add_argument("--num-prompts", type=int, default=100, help="requests to send (default: 100)")
    g.add_argument("--input-len", type=int, default=128, help="random/text: prompt tokens (default: 128)")
    g.add_argument("--output-len", type=int, default=128,
                   help="random/text/tasks: max_tokens per request (default: 128)")
    g.add_argument("--range-ratio", type=float, default=0.0,
                   help="random: lengths uniform in [len*(1-r), len*(1+r)] (default: 0)")
    g.add_argument("--length-scale", type=float, default=1.0,
                   help="sharegpt-like: scale both lengths, e.g. 0.25 on CPU (default: 1)")
    g.add_argument("--text-dir", default="data_cache/extracted",
                   help="text: unpacked sources of scripts/data/fetch.sh (default: data_cache/extracted)")
    g.add_argument("--seed", type=int, default=0, help="seed of lengths, prompts and arrivals (default: 0)")


def dataset_spec_from_args(args: argparse.Namespace) -> DatasetSpec:
    return DatasetSpec(args.dataset, args.num_prompts, args.input_len, args.output_len, args.range_ratio,
                       args.length_scale, args.text_dir, args.seed)
