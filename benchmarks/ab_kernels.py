"""In-engine A/B of the decode-step kernel options (GPU): one engine per variant over ONE copy
of the random 8B weights, each captured with its own switches; timed runs alternate the
variants round by round so clock and neighbour drift hit all alike; medians are reported.

Variants, each adding one option to the one before:
  cublas      F.linear for every projection (MAX_ROWS = 0), no silu fusion, no PDL
  skinny      the weight-streaming kernel for steps of <= 16 rows (session 4's engine)
  fuse_silu   the down projection forms silu(gate) * up itself (no activation kernel)
  pdl         every Triton kernel launched with programmatic dependent launch
  pdl_l2      PDL + each skinny linear prefetches its weights into L2 before its wait

  PYTHONPATH=src python benchmarks/ab_kernels.py --out ab_kernels.json [--rounds 3]
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
from optimus.kernels import _skinny_linear_triton, pdl, skinny_linear

CASES = (("llama-8b", "ar", 1, (1, 8, 32)), ("llada-8b", "fixed:32", 4, (1, 8)))
VARIANTS = {  # (MAX_ROWS, FUSE_SILU, PDL, PREFETCH_BYTES)
    "cublas": (0, False, False, 0),
    "skinny": (16, False, False, 0),
    "fuse_silu": (16, True, False, 0),
    "pdl": (16, True, True, 0),
    "pdl_l2": (16, True, True, 32768),
}


@contextlib.contextmanager
def switches(max_rows: int, fuse_silu: bool, use_pdl: bool, prefetch: int):
    """Kernel options for what runs (and is captured) inside; restored on exit."""
    saved = (skinny_linear.MAX_ROWS, skinny_linear.FUSE_SILU, pdl.ENABLED,
             _skinny_linear_triton.PREFETCH_BYTES)
    (skinny_linear.MAX_ROWS, skinny_linear.FUSE_SILU, pdl.ENABLED,
     _skinny_linear_triton.PREFETCH_BYTES) = max_rows, fuse_silu, use_pdl, prefetch
    try:
        yield
    finally:
        (skinny_linear.MAX_ROWS, skinny_linear.FUSE_SILU, pdl.ENABLED,
         _skinny_linear_triton.PREFETCH_BYTES) = saved


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
