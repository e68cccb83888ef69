"""``optimus generate``: decode one prompt with a reference decoder and print the text and the
decoding statistics."""

from __future__ import annotations

import argparse

from optimus.reference.algorithms import ALGORITHMS, DecodeSettings, answer_ids, decode, natural_algorithm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="Hugging Face model directory, or 'default' for the shipped model")
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--max-tokens", type=int, default=64, help="answer length (canvas size for dLLMs)")
    parser.add_argument("--algorithm", default="auto", choices=("auto",) + tuple(ALGORITHMS),
                        help="decoder; auto picks the family's own (llada, dream, sdar, or ar for causal LMs)")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps (default: one token per step; SDAR: the block size per block)")
    parser.add_argument("--block-length", type=int, default=None,
                        help="block length (default: 32 for LLaDA-style decoders, the trained block for SDAR)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="confidence threshold for fast-dllm* (default 0.9) and sdar (default 0.85)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")


# (flag, attribute, valid?, what is expected): checked before anything loads.
_FLAG_CHECKS = (
    ("--max-tokens", "max_tokens", lambda v: v >= 1, "an integer >= 1"),
    ("--steps", "steps", lambda v: v is None or v >= 1, "an integer >= 1"),
    ("--block-length", "block_length", lambda v: v is None or v >= 1, "an integer >= 1"),
    ("--threshold", "threshold", lambda v: v is None or 0.0 < v <= 1.0, "in (0, 1]"),
    ("--temperature", "temperature", lambda v: v >= 0.0, ">= 0"),
)


def _settings(args: argparse.Namespace) -> DecodeSettings:
    for flag, attr, valid, expected in _FLAG_CHECKS:
        value = getattr(args, attr)
        if not valid(value):
            raise ValueError(f"{flag} must be {expected}, got {value}")
    return DecodeSettings(max_tokens=args.max_tokens, steps=args.steps, block_length=args.block_length,
                          threshold=args.threshold, temperature=args.temperature)


def _prompt_ids(loaded, text: str, chat: bool) -> list[int]:
    tokenizer = loaded.tokenizer
    if chat:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return tokenizer.encode(rendered, add_special_tokens=False)
    return tokenizer.encode(text, add_special_tokens=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from optimus.models.loader import load_model

    settings = _settings(args)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    prompt = _prompt_ids(loaded, args.prompt, args.chat)
    if not prompt:
        raise ValueError("the prompt encodes to no tokens")
    name = natural_algorithm(loaded.spec) if args.algorithm == "auto" else args.algorithm
    torch.manual_seed(args.seed)
    result = decode(name, loaded.model, prompt, settings)
    answer = answer_ids(result.generated[0], loaded.spec, args.max_tokens)
    print(loaded.tokenizer.decode(answer, skip_special_tokens=True))
    print(f"[{name}] prompt={len(prompt)} answer={len(answer)} {result.stats.summary()}")
    return 0
