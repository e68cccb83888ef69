"""``optimus generate``: decode one prompt on the serving engine (the same scheduler, policy,
KV cache and kernels as ``optimus serve``) and print the answer and the engine's own decoding
statistics. ``--reference`` decodes with a published reference algorithm instead: exact to
its paper, and slow (it recomputes the whole sequence at every step)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

from optimus.config import EngineConfig, add_config_args, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from optimus.reference.algorithms import ALGORITHMS

    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--max-tokens", type=int, default=64, help="most answer tokens (default: 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily (default: 0)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="confidence a position needs to commit (default: 0.9 on the engine; for the "
                             "reference decoders fast-dllm* 0.9, sdar 0.85)")
    ref = parser.add_argument_group("reference decoders")
    ref.add_argument("--reference", action="store_true",
                     help="decode with the published reference algorithm instead of the engine (slow: it "
                          "recomputes the whole sequence at every step)")
    ref.add_argument("--algorithm", default="auto", choices=("auto",) + tuple(ALGORITHMS),
                     help="reference decoder, implies --reference; auto picks the family's own (llada, dream, "
                          "sdar, or ar for causal LMs) (default: auto)")
    ref.add_argument("--steps", type=int, default=None,
                     help="reference denoising steps (default: one token per step; SDAR: the block size per block)")
    ref.add_argument("--block-length", type=int, default=None,
                     help="reference block length (default: 32 for LLaDA-style decoders, the trained block for SDAR)")
    add_config_args(parser, EngineConfig)  # --model, --policy, --seed, ...: the server's engine flags


# (flag, attribute, valid?, what is expected): checked before anything loads.
_FLAG_CHECKS = (
    ("--max-tokens", "max_tokens", lambda v: v >= 1, "an integer >= 1"),
    ("--steps", "steps", lambda v: v is None or v >= 1, "an integer >= 1"),
    ("--block-length", "block_length", lambda v: v is None or v >= 1, "an integer >= 1"),
    ("--threshold", "threshold", lambda v: v is None or 0.0 < v <= 1.0, "in (0, 1]"),
    ("--temperature", "temperature", lambda v: v >= 0.0, ">= 0"),
)


def _check_flags(args: argparse.Namespace) -> None:
    for flag, attr, valid, expected in _FLAG_CHECKS:
        value = getattr(args, attr)
        if not valid(value):
            raise ValueError(f"{flag} must be {expected}, got {value}")
    if not _uses_reference(args) and (args.steps is not None or args.block_length is not None):
        raise ValueError("--steps and --block-length set the reference decoders: add --reference "
                         "(the engine's block is --block-size)")


def _uses_reference(args: argparse.Namespace) -> bool:
    return args.reference or args.algorithm != "auto"


def _prompt_ids(tokenizer, text: str, chat: bool) -> list[int]:
    if chat:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        ids = tokenizer.encode(rendered, add_special_tokens=False)
    else:
        ids = tokenizer.encode(text, add_special_tokens=True)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    return list(ids)


def run(args: argparse.Namespace) -> int:
    _check_flags(args)
    return _run_reference(args) if _uses_reference(args) else _run_engine(args)


def _flat_options(config) -> dict:
    """An EngineConfig as the flat keyword options :class:`~optimus.engine.llm.LLM` takes."""
    options = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        options.update(_flat_options(value) if dataclasses.is_dataclass(value) else {f.name: value})
    return options


def _run_engine(args: argparse.Namespace) -> int:
    from optimus.engine.llm import LLM
    from optimus.core.params import SamplingParams

    # The engine's start-up notes (which latency profile, measured or re-checked) go to stderr;
    # stdout keeps only the answer and its statistics.
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = config_from_args(EngineConfig, args)
    llm = LLM(**_flat_options(config))
    prompt = _prompt_ids(llm.tokenizer, args.prompt, args.chat)
    extra = {} if args.threshold is None else {"threshold": args.threshold}
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed, **extra)
    t0 = time.perf_counter()
    out = llm.generate([prompt], params)[0]
    wall = time.perf_counter() - t0
    print(out.text)
    print(engine_summary(config.scheduler.policy, len(prompt), out.token_ids, out.stats, wall))
    return 0


def engine_summary(policy: str, prompt_len: int, answer: tuple[int, ...], stats, wall: float) -> str:
    """The stats line. tokens/step counts answer tokens: positions the canvas committed past
    the answer (end-of-text padding, the block's tail past --max-tokens) are decoding work
    but no output, and are reported apart as ``committed``."""
    per_step = len(answer) / stats.steps if stats.steps else 0.0
    chunks = ",".join(f"{c}x{n}" for c, n in sorted(stats.chunk_sizes.items())) or "-"
    return (f"[engine {policy}] prompt={prompt_len} answer={len(answer)} steps={stats.steps} "
            f"tokens/step={per_step:.2f} committed={stats.tokens_committed} chunks={chunks} wall={wall:.3f}s")


def _run_reference(args: argparse.Namespace) -> int:
    import torch

    from optimus.models.loader import load_model
    from optimus.reference.algorithms import DecodeSettings, answer_ids, decode, natural_algorithm

    settings = DecodeSettings(max_tokens=args.max_tokens, steps=args.steps, block_length=args.block_length,
                              threshold=args.threshold, temperature=args.temperature)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, revision=args.revision)
    prompt = _prompt_ids(loaded.tokenizer, args.prompt, args.chat)
    name = natural_algorithm(loaded.spec) if args.algorithm == "auto" else args.algorithm
    torch.manual_seed(args.seed)
    result = decode(name, loaded.model, prompt, settings)
    answer = answer_ids(result.generated[0], loaded.spec, args.max_tokens)
    print(loaded.tokenizer.decode(answer, skip_special_tokens=True))
    print(f"[{name}] prompt={len(prompt)} answer={len(answer)} {result.stats.summary()}")
    return 0
