"""Closed-loop simulation of every policy on a *measured* device profile and an acceptance
regime or profile (CPU only, seconds): what the GPU sweep would give with warm buckets.
Commits are drawn as the engine's replay draws them (by masked positions, ``ReplayTable``);
elastic is seeded with the replayed profile's window tau, as ``bench offline`` seeds it.

  PYTHONPATH=src python -m optimus.bench.experiments.simulate_elastic \
      --profile benchmarks/results/h200/latency_surface/latest.json --acceptance real-8b \
      --out elastic_simulation.json
"""

import argparse
import json
from collections import Counter

from optimus.policy.elastic.latency import LatencyProfile
from optimus.policy.elastic.controller import ElasticPolicy
from optimus.policy.fixed import FixedPolicy
from optimus.decoding import regimes
from optimus.policy.simulate import KneeDevice, ReplayTable, sweep


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--profile", required=True)
    p.add_argument("--acceptance", required=True, help="tasks, prose, smollm2-prose, real-8b, or a profile JSON")
    p.add_argument("--loads", default="1,4,16,64,128,256")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    profile = LatencyProfile.load(args.profile)
    table = ReplayTable(regimes.load(args.acceptance))
    tau = table.table
    fit = profile.fit
    device = KneeDevice(t0=fit.t0, knee=fit.knee, slope=fit.b, noise=0.05)
    policies = {f"fixed:{c}": (lambda c=c: FixedPolicy(c)) for c in (1, 2, 4, 8, 16, 32)}
    policies["elastic (tau prior)"] = lambda: ElasticPolicy(profile=profile, tau_prior=tau)
    policies["elastic (online tau only)"] = lambda: ElasticPolicy(profile=profile)
    loads = tuple(int(x) for x in args.loads.split(","))
    res = sweep(policies, loads, tau=table, device=device, gen_len=256, prompt_len=256,
                steps=300, warmup_steps=100)
    table = {name: {n: round(r[n].throughput, 1) for n in loads} for name, r in res.items()}
    chunks = {name: {n: dict(Counter(c.size for c in r[n].chunk_choices).most_common(3)) for n in loads}
              for name, r in res.items() if name.startswith("elastic")}
    for n in loads:
        best = max(v[n] for k, v in table.items() if k.startswith("fixed"))
        row = "  ".join(f"{k}={v[n]:.0f}" for k, v in table.items())
        print(f"load {n:4d}: {row}  | best fixed {best:.0f}")
    json.dump({"device_profile": args.profile, "acceptance": args.acceptance, "tau": tau,
               "throughput_tok_s": table, "elastic_chunk_choices": chunks}, open(args.out, "w"), indent=2)


if __name__ == "__main__":
    main()
