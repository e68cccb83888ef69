"""A/B of the skinny-linear kernel inside the engine (GPU): two engines over the same random
8B weights shape, one built and run with the Triton kernel for steps of <= 16 rows, one with
F.linear everywhere; timed runs alternate A, B, A, B, ... so clock and neighbour drift hit
both alike, and the median of each side is reported.

  PYTHONPATH=src python benchmarks/ab_linear.py --out ab_linear.json [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics

import torch

from optimus.bench.offline import Target, timed_generate
from optimus.engine.params import SamplingParams
from optimus.kernels import skinny_linear

CASES = (("llama-8b", "ar", 1, (1, 8, 32)), ("llada-8b", "fixed:32", 4, (1, 8)))


@contextlib.contextmanager
def kernel_rows(limit: int):
    """The largest step that uses the kernel (0 = never); graphs captured inside keep it."""
    saved = skinny_linear.MAX_ROWS
    skinny_linear.MAX_ROWS = limit
    try:
        yield
    finally:
        skinny_linear.MAX_ROWS = saved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gen", type=int, default=128)
    args = ap.parse_args()
    target, rows = Target(), []
    variants = {"triton": skinny_linear.MAX_ROWS, "cublas": 0}
    for shape, policy, per_step, batches in CASES:
        params = SamplingParams(max_tokens=args.gen, rule="topk", tokens_per_step=per_step, ignore_eos=True)
        llms = {}
        for name, limit in variants.items():
            with kernel_rows(limit):
                llms[name] = target.llm(shape, policy, max_running=max(batches), block_size=32,
                                        num_pages=1024)  # two engines share the card: a fixed KV cache each
        for b in batches:
            rates = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, limit in variants.items():
                    with kernel_rows(limit):
                        r = timed_generate(llms[name], b, 256, args.gen, params)
                    rates[name].append(r["output_tok_s"])
            row = {"shape": shape, "policy": policy, "tokens_per_step": per_step, "batch": b,
                   **{f"{n}_tok_s": statistics.median(v) for n, v in rates.items()},
                   **{f"{n}_runs": v for n, v in rates.items()}}
            row["speedup"] = row["triton_tok_s"] / row["cublas_tok_s"]
            rows.append(row)
            print(f"{shape} {policy} batch {b}: triton {row['triton_tok_s']:.0f} vs cuBLAS "
                  f"{row['cublas_tok_s']:.0f} tok/s (x{row['speedup']:.3f}; runs {rates})", flush=True)
        del llms
        target.free_memory()
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
