"""In-engine A/B of the decode-step options (GPU): one engine per variant over ONE copy
of the random 8B weights, each built and captured with its own options; timed runs alternate
the variants round by round so clock and neighbour drift hit all alike; medians are reported.

Variants, each adding one option to the one before:
  cublas      F.linear for every projection and the LM head, torch softmax + max
  skinny      the weight-streaming linear for steps of <= 16 rows
  pdl         every Triton kernel launched with programmatic dependent launch
  pdl_greedy  PDL and the split Triton greedy pick (kernels/greedy.py)
  overlap     and causal steps launched before the previous step's tokens are read
              (runner.overlap): the engine's default

  PYTHONPATH=src python -m optimus.bench.experiments.ab_kernels --out ab_kernels.json [--variants skinny,pdl]
      [--rounds 3] [--tiny: a CPU smoke run of the script]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from optimus.bench.timed_runs import timed_generate
from optimus.bench.shapes import random_model
from optimus.engine.llm import LLM
from optimus.core.params import SamplingParams
from optimus import toggles

SKINNY_ROWS = toggles.Toggles().skinny_max_rows
CASES = (("llama-8b", "ar", 1, (1, 8)), ("llada-8b", "fixed:32", 4, (1,)))
VARIANTS = {  # (largest step on the skinny kernel, PDL, greedy backend), overlap
    "cublas": ((0, False, "torch"), False),
    "skinny": ((SKINNY_ROWS, False, "torch"), False),
    "pdl": ((SKINNY_ROWS, True, "torch"), False),
    "pdl_greedy": ((SKINNY_ROWS, True, "auto"), False),
    "overlap": ((SKINNY_ROWS, True, "auto"), True),
}


def switches(max_rows: int, use_pdl: bool, greedy_backend: str):
    """The kernel options of what runs (and is captured) inside; restored on exit."""
    return toggles.override(skinny_max_rows=max_rows, pdl=use_pdl, greedy_backend=greedy_backend)


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
            kernels, overlap = VARIANTS[name]
            with switches(*kernels):
                llms[name] = LLM(loaded=loaded, policy=policy, device=device, max_running=max(batches),
                                 block_size=32, num_pages=pages, graph_precapture=not args.tiny,
                                 overlap=overlap)
        for b in batches:
            rates = {name: [] for name in names}
            cpu = {name: [] for name in names}
            for _ in range(args.rounds):
                for name in names:
                    with switches(*VARIANTS[name][0]):
                        run = timed_generate(llms[name], b, 256, args.gen, params)
                    rates[name].append(run["output_tok_s"])
                    cpu[name].append(run["cpu_ms_per_step"])
            row = {"shape": shape, "policy": policy, "tokens_per_step": per_step, "batch": b,
                   **{f"{n}_tok_s": statistics.median(v) for n, v in rates.items()},
                   **{f"{n}_runs": v for n, v in rates.items()},
                   **{f"{n}_cpu_ms_per_step": statistics.median(v) for n, v in cpu.items()}}
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
