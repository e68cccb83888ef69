"""Fast-dLLM's published loops, timed on this card: the baseline the engine's cache modes are
compared with in the same device call.

``reference/fast_dllm.py`` follows NVlabs/Fast-dLLM ``llada/generate.py`` step for step (one
padded batch, dense torch attention, a whole-sequence forward at each block start); it runs
here on the same random-weight model shape as ``bench offline --experiments schedule4``:
prompt 256, output 256, block 32, 4 tokens per step (LLaDA's top-k schedule).

  PYTHONPATH=src python -m optimus.bench.experiments.fast_dllm_baseline --out fast_dllm.json
  (CPU smoke run: --device cpu --tiny --batches 1,2)
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from optimus.bench.shapes import random_model
from optimus.reference import fast_dllm

LOOPS = {"dual-cache": fast_dllm.generate_with_dual_cache, "prefix-cache": fast_dllm.generate_with_prefix_cache}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_loop(model, loop: str, batch: int, prompt_len: int, gen_len: int, block: int, device: str) -> dict:
    vocab = model.spec.arch.vocab_size
    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(100, vocab - 1000, (batch, prompt_len), generator=gen).to(device)
    run = lambda: LOOPS[loop](model, prompts, steps=gen_len // 4, gen_length=gen_len,  # noqa: E731
                              block_length=block)
    run()  # warm-up (kernels, allocator)
    _sync(device)
    t0 = time.perf_counter()
    result = run()
    _sync(device)
    wall = time.perf_counter() - t0
    tokens = batch * gen_len
    return {"loop": loop, "batch": batch, "output_tokens": tokens, "wall_s": wall,
            "output_tok_s": tokens / wall, "forwards": result.stats.steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llada-8b")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--loops", default="dual-cache,prefix-cache")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--gen-len", type=int, default=256)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = random_model(args.shape, device=args.device, dtype=dtype, tiny=args.tiny).model
    rows = []
    with torch.inference_mode():
        for loop in args.loops.split(","):
            for b in (int(x) for x in args.batches.split(",")):
                rows.append(time_loop(model, loop, b, args.prompt_len, args.gen_len, 32, args.device))
                print(f"  fast-dllm {loop} batch={b}: {rows[-1]['output_tok_s']:.1f} tok/s "
                      f"({rows[-1]['forwards']} forwards)", flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    with open(args.out, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "shape": args.shape, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
