"""``optimus eval``: score decoding configurations.

``--suite tasks`` (the default): exact-match accuracy and tau per decoding configuration on
held-out tasks. ``--suite chat``: the chat suite, a diffusion model (``--model``) against its
autoregressive base (``--base``) on 300 chat prompts, reported in one table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_HELDOUT_ROWS = Path("data_cache/prep/text_val.bin.gz")
# Defaults that differ per suite (the options default to None: the suite's own).
TASKS_LIMIT, TASKS_MAX_TOKENS = 100, 64
CHAT_MAX_TOKENS = 256  # open prose needs room that one-line task answers do not


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from optimus_lab.evaluation.runner import DEFAULT_CONFIGS
    from optimus_lab.evaluation.tasks import SCORED_TASKS
    parser.add_argument("--suite", choices=("tasks", "chat"), default="tasks",
                        help="tasks: held-out task sets; chat: --model against its autoregressive --base "
                             "on the 300-prompt chat set")
    parser.add_argument("--model", default="default",
                        help="what --model takes elsewhere: a directory, .gguf file, Hub id, alias (smollm2-135m) "
                             "or 'default' (the tasks score exact answers in the default model's format); "
                             "chat: the diffusion model")
    parser.add_argument("--base", default="smollm2-135m",
                        help="chat: the autoregressive base model (runs the 'ar' config and scores prose answers)")
    parser.add_argument("--tasks", default=",".join(SCORED_TASKS),
                        help=f"comma-separated tasks (known: {', '.join(SCORED_TASKS)})")
    parser.add_argument("--configs", default=None,
                        help="comma-separated decoding configs: reference, ar, fixed:C, elastic (tasks default: "
                             f"{','.join(DEFAULT_CONFIGS)}; chat default: ar,fixed:32,elastic)")
    parser.add_argument("--limit", type=int, default=None,
                        help="tasks: held-out examples per task (default 100); chat: prompts per kind (default all)")
    parser.add_argument("--max-tokens", type=int, default=None, help="answer length cap (tasks 64, chat 256)")
    parser.add_argument("--threshold", type=float, default=0.9, help="confidence threshold for commits")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quantization", default=None, choices=("fp8",),
                        help="fp8: evaluate --model with its projection weights rounded to FP8 (docs/models.md)")
    parser.add_argument("--heldout-text", default=str(DEFAULT_HELDOUT_ROWS),
                        help="tasks: packed held-out text rows (python -m optimus_lab.train prepare); "
                             "skipped if absent")
    parser.add_argument("--out", default=None, help="write the full result JSON here")
    parser.add_argument("--tau-profile", default=None, help="tasks: write the tau-per-chunk-size profile JSON here")


def run(args: argparse.Namespace) -> int:
    return _run_chat(args) if args.suite == "chat" else _run_tasks(args)


def _configs(text: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    return default if text is None else tuple(c for c in text.split(",") if c)


def _or(value, default):
    return default if value is None else value


def _write(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1) + "\n")


def _run_tasks(args: argparse.Namespace) -> int:
    from optimus_lab.evaluation.runner import DEFAULT_CONFIGS, EvalSpec, run_eval, tau_profile
    from optimus_lab.evaluation.tasks import TASKS
    from optimus.models.loader import load_model
    tasks = tuple(t for t in args.tasks.split(",") if t)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {sorted(TASKS)}")
    loaded = load_model(args.model, device=args.device, progress=False, quantization=args.quantization)
    spec = EvalSpec(tasks, _configs(args.configs, DEFAULT_CONFIGS), _or(args.limit, TASKS_LIMIT),
                    _or(args.max_tokens, TASKS_MAX_TOKENS), args.threshold, args.device)

    def save(result: dict) -> None:
        _write(args.out, result)
        _write(args.tau_profile, tau_profile(result))

    save(run_eval(loaded, spec, Path(args.heldout_text) if args.heldout_text else None, save=save))
    return 0


def _run_chat(args: argparse.Namespace) -> int:
    from optimus_lab.evaluation.chat_suite import CHAT_CONFIGS, format_table, run_chat_eval
    from optimus.models.loader import load_model
    dllm = load_model(args.model, device=args.device, progress=False, quantization=args.quantization)
    base = load_model(args.base, device=args.device, progress=False)
    result = run_chat_eval(dllm, base, _configs(args.configs, CHAT_CONFIGS),
                           max_tokens=_or(args.max_tokens, CHAT_MAX_TOKENS), threshold=args.threshold,
                           device=args.device, limit_per_kind=args.limit,
                           save=lambda r: _write(args.out, r))
    print(format_table(result))
    return 0
