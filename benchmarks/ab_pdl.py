"""In-engine A/B of programmatic dependent launch (GPU): one engine per variant over ONE copy
of the random 8B weights, each captured with its own launch mode; timed runs alternate the
variants round by round so clock and neighbour drift hit all alike; medians are reported.

Variants (launch mode, greedy pick):
  no_pdl      every Triton kernel launched the ordinary way, torch softmax + max (session 4's engine)
  pdl         every Triton kernel launched with programmatic dependent launch, torch greedy pick
  pdl_greedy  PDL and the split Triton greedy pick (kernels/greedy.py): the default

  PYTHONPATH=src python benchmarks/ab_pdl.py --out ab_pdl.json [--rounds 3] [--tiny: a CPU smoke run]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics

import torch

from optimus.bench.offline import timed_generate
from optimus.bench.shapes import random_model
from optimus.engine.llm import LLM
from optimus.engine.params import SamplingParams
from optimus.engine import runner
from optimus.kernels import greedy, pdl

CASES = (("llama-8b", "ar", 1, (1, 8)), ("llada-8b", "fixed:32", 4, (1,)))
VARIANTS = {"no_pdl": (False, "torch"), "pdl": (True, "torch"), "pdl_greedy": (True, "auto")}


@contextlib.contextmanager
def switches(use_pdl: bool, greedy_backend: str):
    """The launch mode and greedy backend of what runs (and is captured) inside; restored on exit."""
    saved = pdl.ENABLED, runner.argmax_prob
    pdl.ENABLED = use_pdl
    runner.argmax_prob = lambda logits, backend="auto": greedy.argmax_prob(logits, greedy_backend)
    try:
        yield
    finally:
        pdl.ENABLED, runner.argmax_prob = saved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run of the script on tiny shapes")
    args = ap.parse_args()
    device = "cpu" if args.tiny else "cuda"
    names = args.variants.split(",")
    rows = []
    for shape, policy, per_step, batches in CASES:
        params = SamplingParams(max_tokens=args.gen, rule="topk", tokens_per_step=per_step, ignore_eos=True)
        loaded = random_model(shape, device=device, dtype=torch.float32 if args.tiny else torch.bfloat16,
                              tiny=args.tiny)
        pages = max(batches) * (256 + args.gen + 64) // 16 + 64
        llms = {}
        for name in names:
            with switches(*VARIANTS[name]):
                llms[name] = LLM(loaded=loaded, policy=policy, device=device, max_running=max(batches),
                                 block_size=32, num_pages=pages, graph_precapture=not args.tiny)
        for b in batches:
            rates = {name: [] for name in names}
            for _ in range(args.rounds):
                for name in names:
                    with switches(*VARIANTS[name]):
                        rates[name].append(timed_generate(llms[name], b, 256, args.gen, params)["output_tok_s"])
            row = {"shape": shape, "policy": policy, "tokens_per_step": per_step, "batch": b,
                   **{f"{n}_tok_s": statistics.median(v) for n, v in rates.items()},
                   **{f"{n}_runs": v for n, v in rates.items()}}
            rows.append(row)
            print(f"{shape} {policy} batch {b}: " + ", ".join(
                f"{n} {row[f'{n}_tok_s']:.1f}" for n in names) + " tok/s", flush=True)
        del llms, loaded
        if not args.tiny:
            torch.cuda.empty_cache()
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if not args.tiny else "cpu (tiny)", "torch": torch.__version__,
                       "variants": {n: VARIANTS[n] for n in names}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
