"""FP8-weight linear microbenchmark (GPU): the Triton FP8 kernel against bf16 (cuBLAS, and the
bf16 skinny kernel at <= 16 rows) on the 8B projection shapes, as time, weight bandwidth
(bytes of the weight each call reads) and matmul rate, with its error against the fp32
product of the same FP8 weights.

  PYTHONPATH=src python -m optimus.bench.experiments.fp8_micro --out fp8.json [--sweep]

--sweep also times a grid of tile configs at 1, 16 and 1024 rows on each shape and reports the
best (how default_config should be chosen). Times are triton.testing.do_bench medians with the
L2 flushed before every call.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
import triton

from optimus.bench.experiments.skinny_micro import time_us
from optimus.kernels._fp8_linear_triton import Fp8Config, default_config, fp8_linear_triton
from optimus.kernels._skinny_linear_triton import skinny_linear_triton
from optimus.models.fp8 import quantize_rows

# (name, N, K): the merged projections of Llama-3-8B and LLaDA-8B (the LM head stays bf16).
SHAPES = [("llama qkv", 6144, 4096), ("llama o", 4096, 4096), ("llama gate_up", 28672, 4096),
          ("llama down", 4096, 14336), ("llada qkv", 12288, 4096), ("llada gate_up", 24576, 4096),
          ("llada down", 4096, 12288)]
SWEEP_SMALL = [Fp8Config(16, bn, bk, st, nw) for bn, bk, st, nw in
               itertools.product((16, 32, 64), (256, 512, 1024), (3, 4, 6), (4, 8))]
SWEEP_LARGE = [Fp8Config(bm, bn, bk, st, nw) for bm, bn, bk, st, nw in
               itertools.product((64, 128), (64, 128, 256), (64, 128), (3, 4), (4, 8))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--rows", default="1,4,16,64,256,1024")
    ap.add_argument("--shapes", default=",".join(name for name, _, _ in SHAPES), help="which of SHAPES")
    args = ap.parse_args()
    dev = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "cases": [], "sweep": []}
    for name, n, k in [s for s in SHAPES if s[0] in args.shapes.split(",")]:
        w = torch.randn(n, k, device=dev) / k ** 0.5
        q, scale = quantize_rows(w)
        scale = scale.reshape(-1).contiguous()
        w16 = (q.float() * scale[:, None]).to(torch.bfloat16)  # the same values in bf16
        del w
        best = _sweep(name, q, scale, k, result) if args.sweep else {}
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            exact = x.float() @ (q.float() * scale[:, None]).T
            got = fp8_linear_triton(x, q, scale, None)
            row = {"shape": name, "n": n, "k": k, "rows": m, "fp8_weight_gb": (q.numel() + 4 * n) / 1e9,
                   "bf16_weight_gb": w16.numel() * 2 / 1e9,
                   "fp8_max_rel_err": ((got.float() - exact).abs().max() / exact.abs().max()).item(),
                   "fp8_us": time_us(lambda: fp8_linear_triton(x, q, scale, None)),
                   "cublas_bf16_us": time_us(lambda: F.linear(x, w16)),
                   "default_config": default_config(m, n, k).__dict__}
            if m <= 16:
                row["skinny_bf16_us"] = time_us(lambda: skinny_linear_triton(x, w16, None))
            if m in best:
                row["best_sweep_us"], row["best_sweep_config"] = best[m][1], best[m][0].__dict__
            row["fp8_tb_s"] = row["fp8_weight_gb"] / row["fp8_us"] * 1e3
            row["fp8_tflop_s"] = 2 * m * n * k / row["fp8_us"] / 1e6
            row["cublas_bf16_tflop_s"] = 2 * m * n * k / row["cublas_bf16_us"] / 1e6
            result["cases"].append(row)
            print(f"{name:14s} rows {m:4d}: fp8 {row['fp8_us']:8.1f} us ({row['fp8_tb_s']:.2f} TB/s, "
                  f"{row['fp8_tflop_s']:.0f} TFLOP/s)  cuBLAS bf16 {row['cublas_bf16_us']:8.1f} us"
                  + (f"  skinny bf16 {row['skinny_bf16_us']:.1f} us" if "skinny_bf16_us" in row else "")
                  + f"  err {row['fp8_max_rel_err']:.1e}", flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


def _sweep(name: str, q: torch.Tensor, scale: torch.Tensor, k: int, result: dict) -> dict:
    """{rows: (best config, us)} at 1, 16 and 1024 rows."""
    best = {}
    for m, grid in ((1, SWEEP_SMALL), (16, SWEEP_SMALL), (1024, SWEEP_LARGE)):
        x = torch.randn(m, k, device=q.device, dtype=torch.bfloat16)
        for cfg in grid:
            try:
                us = time_us(lambda: fp8_linear_triton(x, q, scale, None, config=cfg))
            except Exception as exc:  # out of shared memory / registers for this tile
                print(f"  {name} rows {m} {cfg}: {type(exc).__name__}")
                continue
            result["sweep"].append({"shape": name, "rows": m, "config": cfg.__dict__, "us": us})
            if m not in best or us < best[m][1]:
                best[m] = (cfg, us)
        if m in best:
            print(f"{name} rows {m}: best {best[m][0]} {best[m][1]:.1f} us", flush=True)
    return best


if __name__ == "__main__":
    main()
