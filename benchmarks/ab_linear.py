"""A/B of the skinny-linear kernel inside the engine (GPU): one engine per variant over the
same random 8B weights shape, each built and run with its own kernel choice for steps of
<= 16 rows: the persistent grid (the default), one program per column tile (session 4's
kernel), or F.linear (cuBLAS) everywhere. Timed runs alternate the variants round by round
so clock and neighbour drift hit all alike, and the median of each is reported.

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
from optimus.kernels import _skinny_linear_triton, skinny_linear

CASES = (("llama-8b", "ar", 1, (1, 8)),)  # larger steps (> 16 rows) never reach the kernel


VARIANTS = {"persistent": (skinny_linear.MAX_ROWS, True), "tile_grid": (skinny_linear.MAX_ROWS, False),
            "cublas": (0, False)}


@contextlib.contextmanager
def kernel_choice(limit: int, persistent: bool):
    """The largest step that uses the kernel (0 = never) and its grid; graphs captured inside
    keep them."""
    saved = skinny_linear.MAX_ROWS, _skinny_linear_triton.PERSISTENT
    skinny_linear.MAX_ROWS, _skinny_linear_triton.PERSISTENT = limit, persistent
    try:
        yield
    finally:
        skinny_linear.MAX_ROWS, _skinny_linear_triton.PERSISTENT = saved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gen", type=int, default=128)
    args = ap.parse_args()
    target, rows = Target(), []
    variants = VARIANTS
    for shape, policy, per_step, batches in CASES:
        params = SamplingParams(max_tokens=args.gen, rule="topk", tokens_per_step=per_step, ignore_eos=True)
        llms = {}
        for name, choice in variants.items():
            with kernel_choice(*choice):
                llms[name] = target.llm(shape, policy, max_running=max(batches), block_size=32,
                                        num_pages=1024)  # engines share the card: a fixed KV cache each
        for b in batches:
            rates = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, choice in variants.items():
                    with kernel_choice(*choice):
                        r = timed_generate(llms[name], b, 256, args.gen, params)
                    rates[name].append(r["output_tok_s"])
            row = {"shape": shape, "policy": policy, "tokens_per_step": per_step, "batch": b,
                   **{f"{n}_tok_s": statistics.median(v) for n, v in rates.items()},
                   **{f"{n}_runs": v for n, v in rates.items()}}
            rows.append(row)
            print(f"{shape} {policy} batch {b}: " + ", ".join(f"{n} {row[f'{n}_tok_s']:.1f}" for n in variants)
                  + f" tok/s (runs {rates})", flush=True)
        del llms
        target.free_memory()
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
