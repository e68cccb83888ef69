"""`optimus bench acceptance`: measure the acceptance profile of a model — how many positions
each step commits, per chunk size — on held-out task prompts, for benchmarks to replay.

Output JSON: ``tau_per_chunk`` {C: mean commits per step} and ``histograms`` {C: {k: steps}}.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

from optimus.engine.llm import LLM
from optimus.engine.params import SamplingParams
from optimus.engine.policies.fixed import FixedPolicy

CHUNKS = (1, 2, 4, 8, 16, 32)


def prompts_for(llm: LLM, tasks: list[str], per_task: int) -> list[list[int]]:
    from optimus.evaluation.tasks import heldout_set

    tok = llm.tokenizer
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": ex.question}]))
            for task in tasks for ex in heldout_set(task, per_task)]


def measure(llm: LLM, prompts: list[list[int]], chunk: int, params: SamplingParams) -> collections.Counter:
    """Commits per decode step at ``fixed:chunk`` (every step of every request)."""
    engine = llm.engine
    engine.scheduler.policy = FixedPolicy(chunk)
    for i, p in enumerate(prompts):
        engine.add_request(f"acc-{chunk}-{i}", p, params)
    hist: collections.Counter = collections.Counter()
    while engine.has_work():
        for out in engine.step():
            for e in out.events:
                hist[len(e.positions)] += 1
    return hist


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default")
    p.add_argument("--tasks", default="add3,sub3,count,sort,copy,reverse")
    p.add_argument("--per-task", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--out", required=True)


def run(args: argparse.Namespace) -> int:
    llm = LLM(args.model, policy="fixed:1")
    llm.engine.stream_text = False
    prompts = prompts_for(llm, args.tasks.split(","), args.per_task)
    params = SamplingParams(max_tokens=args.max_tokens, threshold=args.threshold)
    result = {"model": str(llm.engine.loaded.path), "tasks": args.tasks, "prompts": len(prompts),
              "threshold": args.threshold, "max_tokens": args.max_tokens, "tau_per_chunk": {}, "histograms": {}}
    for c in CHUNKS:
        t0 = time.perf_counter()
        hist = measure(llm, prompts, c, params)
        steps = sum(hist.values())
        result["tau_per_chunk"][str(c)] = sum(k * n for k, n in hist.items()) / max(steps, 1)
        result["histograms"][str(c)] = {str(k): n for k, n in sorted(hist.items())}
        print(f"fixed:{c:<3d} tau {result['tau_per_chunk'][str(c)]:.2f} over {steps} steps "
              f"({time.perf_counter() - t0:.1f}s)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0
