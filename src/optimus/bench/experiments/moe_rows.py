"""What an MoE dLLM step pays for: its window's mask rows against its stored rows.

A stored row is a committed token: it routes on its own, to top-k experts of its own, where one
request's mask rows route alike and reach few (docs/models.md, "Mask rows route alike"). So an
MoE step's time is not a function of its rows alone. This times the start-up profiler's
synthetic steps (each request its own context, ``executor.timed_step``) at a few batches and
chunks with 0, a few, half and all of each request's rows stored, on random weights, graphs
serving the steps as in the engine:

  PYTHONPATH=src python -m optimus.bench.experiments.moe_rows --out DIR [--shape llada2-mini]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from optimus.bench.timed_runs import Target
from optimus.executor.timed_step import make_step_fn, stored_rows

CONTEXT = 256  # cached positions of each request's own context (the sweeps' prompt length)


def stored_counts(chunk: int) -> list[int]:
    """A request's stored rows to time at ``chunk`` rows: none, the profiler's, half, all."""
    return sorted({0, stored_rows(chunk), chunk // 2, chunk})


def time_cells(step, batches: list[int], chunks: list[int]) -> list[dict]:
    rows = []
    for batch in batches:
        for chunk in chunks:
            for stored in stored_counts(chunk):
                step(batch, chunk, stored)  # warm-up (and the contexts of a new batch)
                ms = 1e3 * step(batch, chunk, stored)
                rows.append({"batch": batch, "chunk": chunk, "stored": stored, "rows": batch * chunk, "ms": ms})
                print(f"  batch {batch:3d} x {chunk:2d} rows, {stored:2d} stored each: {ms:6.2f} ms", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for moe_rows.json")
    p.add_argument("--shape", default="llada2-mini")
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--chunks", default="8,16,32")
    p.add_argument("--graph-max-tokens", type=int, default=2048)
    p.add_argument("--cpu-tiny", action="store_true", help="a smoke run of the code on a CPU (tiny shapes)")
    args = p.parse_args(argv)
    t0 = time.time()
    target = Target(device="cpu", tiny=True) if args.cpu_tiny else Target(graph_max_tokens=args.graph_max_tokens)
    batches, chunks = [int(b) for b in args.batches.split(",")], [int(c) for c in args.chunks.split(",")]
    llm = target.llm(args.shape, "fixed:32", max_running=max(batches), block_size=32)
    rows = time_cells(make_step_fn(llm.engine, context=CONTEXT), batches, chunks)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if target.cuda else "cpu (tiny)"
    result = {"shape": args.shape, "device": device, "graph_max_tokens": args.graph_max_tokens, "context": CONTEXT,
              "cells": rows, "wall_s": round(time.time() - t0, 1)}
    (out / "moe_rows.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'moe_rows.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
