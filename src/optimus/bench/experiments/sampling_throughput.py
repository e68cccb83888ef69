"""Sampled against greedy decoding throughput: what temperature/top-p sampling costs per step.

Random weights at a published shape, ``ignore_eos``, every request sampled with its own seed
(the engine seeds unseeded sampled requests). ``python -m optimus.bench.experiments.sampling_throughput
--out FILE.json`` (``--smoke``: tiny shape on the CPU).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from optimus.core.params import SamplingParams

MODES = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=1.0, top_p=0.95)}


def run_case(model: str, policy: str, batch: int, prompt_len: int, gen_len: int, device: str) -> dict:
    from optimus.engine.llm import LLM
    llm = LLM(model, policy=policy, device=device, max_running=batch, max_waiting=max(1024, batch))
    prompts = [[100 + (i * 7 + j) % 5000 for j in range(prompt_len)] for i in range(batch)]
    row = {"model": model, "policy": policy, "batch": batch, "prompt_len": prompt_len, "gen_len": gen_len}
    for mode, kw in MODES.items():
        params = SamplingParams(max_tokens=gen_len, ignore_eos=True, **kw)
        llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True, **kw))  # warm-up at full batch (graphs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.token_ids) for o in outs)
        row[mode] = {"seconds": round(seconds, 3), "tok_per_s": round(tokens / seconds, 1)}
        print(json.dumps({"policy": policy, "batch": batch, "mode": mode, **row[mode]}), flush=True)
    llm.engine.close()
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--cases", default="smollm2-135m:ar:512,smollm2-135m:ar:64,sdar-8b:fixed:4:32",
                   help="comma-separated SHAPE:POLICY:BATCH (POLICY may hold a colon: fixed:4)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="random-tiny shapes, CPU, batch 4, 8 tokens")
    args = p.parse_args(argv)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu"
    rows: list[dict] = []

    def save() -> None:  # after every case: a later case's failure keeps the earlier rows
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"experiment": "sampling_throughput", "device": device, "rows": rows},
                                             indent=1) + "\n")
    for case in args.cases.split(","):
        shape, rest = case.split(":", 1)
        policy, batch = rest.rsplit(":", 1)
        if args.smoke:
            rows.append(run_case(f"random-tiny:{shape}", policy, 4, 8, 8, "cpu"))
        else:
            rows.append(run_case(f"random:{shape}", policy, int(batch), args.prompt_len, args.gen_len, args.device))
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
