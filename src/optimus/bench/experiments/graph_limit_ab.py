"""Does serving steps of 512-1024 tokens from CUDA graphs pay? (GPU; the offline policy
sweep's workload at concurrency 16)

  PYTHONPATH=src python -m optimus.bench.experiments.graph_limit_ab --out graph_limit_ab.json

Same workload as the offline sweep (SDAR-8B shape, replayed acceptance, 256+256 tokens), at
graph_max_tokens 512 and 1024, each engine pre-captured, rounds interleaved, medians reported.
"""

import argparse
import json
import statistics

import torch

from optimus.bench.timed_runs import Target, timed_generate
from optimus.decoding.replay import ReplayAcceptance, load_acceptance
from optimus.core.params import SamplingParams

ACCEPTANCE = "benchmarks/results/cpu/acceptance/latest.json"
PROFILE = "benchmarks/results/h100/latency_surface/latest.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--policies", default="fixed:32,elastic")
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    target, acc, rows = Target(), load_acceptance(ACCEPTANCE), []
    params = SamplingParams(max_tokens=256, ignore_eos=True)
    for policy in args.policies.split(","):
        llms = {limit: target.llm("sdar-8b", policy, commit_rule=ReplayAcceptance(acc), max_running=64,
                                  block_size=32, profile_path=PROFILE, acceptance_profile=ACCEPTANCE,
                                  graph_max_tokens=limit, num_pages=2048) for limit in (512, 1024)}
        rates = {limit: [] for limit in llms}
        for i in range(args.rounds + 1):
            for limit, llm in llms.items():
                r = timed_generate(llm, args.concurrency, 256, 256, params, full_warmup=True, warmup=i == 0, seed=i)
                if i:
                    rates[limit].append(r["output_tok_s"])
        row = {"policy": policy, "concurrency": args.concurrency,
               **{f"graph_max_{k}_tok_s": statistics.median(v) for k, v in rates.items()},
               **{f"graph_max_{k}_runs": v for k, v in rates.items()}}
        rows.append(row)
        print(row, flush=True)
        del llms
        target.free_memory()
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
