"""`optimus bench acceptance`: measure the acceptance profile of a model — how many positions
each step commits, per chunk size — on held-out task prompts (``--tasks``) or on a prompt file (``--prompts``: JSONL of ``{"kind":
"prose"|"chat", "prompt", "max_tokens"}``, e.g. benchmarks/prompts/acceptance_prose.jsonl), for
benchmarks to replay.

Output JSON: ``tau_per_chunk`` {C: mean commits per step}, ``histograms`` {C: {k: steps}} and
``by_open`` {C: {m: {k: steps}}}, the same steps split by the masked positions m the window
held, and the model's ``block`` (a chunk above it decodes a block at a time). A replay must
draw from ``by_open``: a chunk's late steps commit few because few positions are left, and
drawing those small counts for a full window would charge large chunks twice
(decoding/replay.py, ReplayAcceptance).
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from dataclasses import replace
from pathlib import Path

from optimus.engine.llm import LLM
from optimus.core.params import SamplingParams
from optimus.policy.fixed import FixedPolicy

CHUNKS = (1, 2, 4, 8, 16, 32)


def prompts_for(llm: LLM, tasks: list[str], per_task: int) -> list[list[int]]:
    from optimus_lab.evaluation.tasks import heldout_set

    tok = llm.tokenizer
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": ex.question}]))
            for task in tasks for ex in heldout_set(task, per_task)]


def prompts_from_file(llm: LLM, path: str) -> list[tuple[list[int], int]]:
    """(prompt ids, max tokens) per line: ``chat`` prompts rendered with the chat template,
    ``prose`` prompts continued as raw text."""
    tok, out = llm.tokenizer, []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            text = row["prompt"]
            if row.get("kind", "chat") == "chat":
                text = tok.apply_chat_template([{"role": "user", "content": text}])
            out.append((tok.encode(text), int(row["max_tokens"])))
    return out


def measure(llm: LLM, prompts: list[list[int]], chunk: int, params: SamplingParams,
            max_tokens: list[int] | None = None) -> collections.Counter:
    """(masked positions in the window, commits) per decode step at ``fixed:chunk``, over
    every step of every request (``max_tokens``: per prompt, overriding ``params``)."""
    engine = llm.engine
    engine.scheduler.policy = FixedPolicy(chunk)
    for i, p in enumerate(prompts):
        own = params if max_tokens is None else replace(params, max_tokens=max_tokens[i])
        engine.add_request(f"acc-{chunk}-{i}", p, own)
    steps: collections.Counter = collections.Counter()
    committed: dict[str, set[int]] = collections.defaultdict(set)  # canvas offsets, per request
    while engine.has_work():
        for out in engine.step():
            done = committed[out.request_id]
            for e in out.events:
                masked = sum(1 for q in range(e.chunk_start, e.chunk_end) if q not in done)
                steps[masked, len(e.positions)] += 1
                done.update(e.positions)
    return steps


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default")
    p.add_argument("--tasks", default="add3,sub3,count,sort,copy,reverse")
    p.add_argument("--prompts", default=None, help="JSONL prompt file (kind, prompt, max_tokens) instead of --tasks")
    p.add_argument("--per-task", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--out", required=True)


def run(args: argparse.Namespace) -> int:
    llm = LLM(args.model, policy="fixed:1")
    llm.engine.post.stream_text = False
    params = SamplingParams(max_tokens=args.max_tokens, threshold=args.threshold)
    lengths = None
    if args.prompts:
        prompts, lengths = map(list, zip(*prompts_from_file(llm, args.prompts)))
    else:
        prompts = prompts_for(llm, args.tasks.split(","), args.per_task)
    source = {"prompt_file": args.prompts} if args.prompts else {"tasks": args.tasks}
    result = {"model": str(llm.engine.loaded.path), "block": llm.engine.block_size, **source, "prompts": len(prompts),
              "threshold": args.threshold, "max_tokens": lengths or args.max_tokens, "tau_per_chunk": {}, "histograms": {},
              "by_open": {}}
    for c in CHUNKS:
        t0 = time.perf_counter()
        pairs = measure(llm, prompts, c, params, lengths)
        hist: collections.Counter = collections.Counter()
        by_open: dict[int, dict[str, int]] = collections.defaultdict(dict)
        for (masked, k), n in sorted(pairs.items()):
            hist[k] += n
            by_open[masked][str(k)] = n
        result["by_open"][str(c)] = {str(m): h for m, h in sorted(by_open.items())}
        steps = sum(hist.values())
        result["tau_per_chunk"][str(c)] = sum(k * n for k, n in hist.items()) / max(steps, 1)
        result["histograms"][str(c)] = {str(k): n for k, n in sorted(hist.items())}
        print(f"fixed:{c:<3d} tau {result['tau_per_chunk'][str(c)]:.2f} over {steps} steps "
              f"({time.perf_counter() - t0:.1f}s)", flush=True)
        # Written after every size: a long CPU run that is cut off keeps what it measured.
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0
