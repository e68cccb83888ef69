"""Skinny-linear microbenchmark (GPU): the Triton weight-streaming kernel vs F.linear (cuBLAS)
on the 8B projection shapes at 1-16 rows, as time and weight bandwidth.

  PYTHONPATH=src python -m optimus.bench.experiments.skinny_micro --out skinny.json [--sweep]

--sweep also times every tile config on each shape (at 8 rows) and reports the best, which is
how default_config was chosen. Times are triton.testing.do_bench medians with the L2 flushed
before every call (the 34-235 MB weights would otherwise partly sit in the 50 MB L2).
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
import triton

from optimus.kernels._skinny_linear_triton import SkinnyConfig, default_config, skinny_linear_triton

# (name, N, K): the merged projections and LM heads of Llama-3-8B and LLaDA-8B.
SHAPES = [
    ("llama qkv", 6144, 4096), ("llama o", 4096, 4096), ("llama gate_up", 28672, 4096),
    ("llama down", 4096, 14336), ("llama head", 128256, 4096),
    ("llada qkv", 12288, 4096), ("llada gate_up", 24576, 4096), ("llada down", 4096, 12288),
    ("llada head", 126464, 4096),
]
SWEEP = [SkinnyConfig(bn, bk, st, nw) for bn, bk, st, nw in
         itertools.product((16, 32, 64), (128, 256, 512), (3, 4, 6), (4, 8))]


def time_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--rows", default="1,8,16")
    args = ap.parse_args()
    dev, dtype = torch.device("cuda"), torch.bfloat16
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "dtype": "bfloat16", "cases": [], "sweep": []}
    for name, n, k in SHAPES:
        w = torch.randn(n, k, device=dev, dtype=dtype) / k ** 0.5
        gb = w.numel() * w.element_size() / 1e9
        best = None
        if args.sweep:
            x = torch.randn(8, k, device=dev, dtype=dtype)
            for cfg in SWEEP:
                try:
                    us = time_us(lambda: skinny_linear_triton(x, w, None, cfg))
                except Exception as exc:  # out of shared memory / registers for this tile
                    print(f"  {name} {cfg}: {type(exc).__name__}")
                    continue
                result["sweep"].append({"shape": name, "n": n, "k": k, "config": cfg.__dict__, "us": us})
                if best is None or us < best[1]:
                    best = (cfg, us)
            print(f"{name}: best {best[0]} {best[1]:.1f} us = {gb / best[1] * 1e3:.2f} TB/s", flush=True)
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, device=dev, dtype=dtype)
            want = F.linear(x, w)
            got = skinny_linear_triton(x, w, None)
            err = (got.float() - want.float()).abs().max().item()
            row = {"shape": name, "n": n, "k": k, "rows": m, "weight_gb": gb, "max_abs_err_vs_cublas": err,
                   "cublas_us": time_us(lambda: F.linear(x, w)),
                   "triton_us": time_us(lambda: skinny_linear_triton(x, w, None)),
                   "default_config": default_config(n, k).__dict__}
            if best is not None:
                row["best_sweep_us"] = time_us(lambda: skinny_linear_triton(x, w, None, best[0]))
                row["best_sweep_config"] = best[0].__dict__
            for key in ("cublas", "triton", "best_sweep"):
                if f"{key}_us" in row:
                    row[f"{key}_tb_s"] = gb / row[f"{key}_us"] * 1e3
            result["cases"].append(row)
            print(f"{name:14s} rows {m:2d}: cuBLAS {row['cublas_us']:7.1f} us ({row['cublas_tb_s']:.2f} TB/s)  "
                  f"triton {row['triton_us']:7.1f} us ({row['triton_tb_s']:.2f} TB/s)  err {err:.2e}", flush=True)
        del w
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
