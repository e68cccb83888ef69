"""``optimus eval``: exact-match accuracy and tau per decoding configuration on held-out tasks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_HELDOUT_ROWS = Path("data_cache/prep/text_val.bin.gz")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from optimus_lab.evaluation.runner import DEFAULT_CONFIGS
    from optimus_lab.evaluation.tasks import SCORED_TASKS
    parser.add_argument("--model", default="default",
                        help="what --model takes elsewhere: a directory, .gguf file, Hub id, alias (smollm2-135m) "
                             "or 'default' (the tasks score exact answers in the default model's format)")
    parser.add_argument("--tasks", default=",".join(SCORED_TASKS),
                        help=f"comma-separated tasks (known: {', '.join(SCORED_TASKS)})")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help="comma-separated decoding configs: reference, ar, fixed:C, elastic")
    parser.add_argument("--limit", type=int, default=100, help="held-out examples per task")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=0.9, help="confidence threshold for commits")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--heldout-text", default=str(DEFAULT_HELDOUT_ROWS),
                        help="packed held-out text rows (python -m optimus_lab.train prepare); skipped if absent")
    parser.add_argument("--out", default=None, help="write the full result JSON here")
    parser.add_argument("--tau-profile", default=None, help="write the tau-per-chunk-size profile JSON here")


def run(args: argparse.Namespace) -> int:
    from optimus_lab.evaluation.runner import EvalSpec, run_eval, tau_profile
    from optimus_lab.evaluation.tasks import TASKS
    from optimus.models.loader import load_model
    tasks = tuple(t for t in args.tasks.split(",") if t)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {sorted(TASKS)}")
    loaded = load_model(args.model, device=args.device, progress=False)
    spec = EvalSpec(tasks, tuple(c for c in args.configs.split(",") if c), args.limit, args.max_tokens,
                    args.threshold, args.device)

    def save(result: dict) -> None:
        for path, payload in ((args.out, result), (args.tau_profile, tau_profile(result))):
            if path:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_text(json.dumps(payload, indent=1) + "\n")

    save(run_eval(loaded, spec, Path(args.heldout_text) if args.heldout_text else None, save=save))
    return 0
