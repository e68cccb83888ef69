"""The served load of `emulated_serving` on a slower host: the card emulated from its step
traces (`python -m optimus.bench.step_traces`), elastic planning on its stored surface, and this
process sharing one CPU core with busy loops, so its host work takes about (loops + 1) times as
long, as on a card machine whose host is slower than this CPU. Rounds alternate the policies;
each row is one run, and the summary the median per policy and rate.

    python benchmarks/slow_host_serving.py --card h200 --loops 2 --rates 30,50 --rounds 3 --out slow.json

Linux only (CPU affinity).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--card", default="h200")
    p.add_argument("--loops", type=int, default=2, help="busy loops sharing the core (0: the host as it is)")
    p.add_argument("--policies", default="elastic,ar")
    p.add_argument("--rates", default="30,50")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    from optimus.bench.experiments.emulated_serving import serve
    from optimus.bench.step_traces import profile_from_traces, sweep_rows
    from optimus.policy.elastic.latency import LatencyProfile

    results = ROOT / "benchmarks" / "results" / a.card
    plan = LatencyProfile.load(results / "latency_surface" / "latest.json")
    device = profile_from_traces(sweep_rows([results / "policy_sweep_real8b" / "latest.json"]))
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    loops = [subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile 1: pass"])
             for _ in range(a.loops)]
    rows = []
    try:
        for k in range(a.rounds):
            for rate in (float(r) for r in a.rates.split(",")):
                for policy in a.policies.split(","):
                    row = {**serve(policy, rate, device, plan=plan), "round": k + 1}
                    rows.append(row)
                    print(f"round {k + 1} {policy:<8} {rate:5.1f} req/s: {row['output_tok_s']:6.0f} tok/s, "
                          f"device busy {row['device_busy_share']:.2f}, kept in flight "
                          f"{row['steps_kept_in_flight']:.2f}, TPOT {row['mean_tpot_ms']:.1f} ms", flush=True)
    finally:
        for loop in loops:
            loop.kill()
    summary = {}
    for key in sorted({(r["policy"], r["rate"]) for r in rows}):
        same = [r["output_tok_s"] for r in rows if (r["policy"], r["rate"]) == key]
        summary[f"{key[0]} {key[1]:g}"] = {"median_tok_s": statistics.median(same), "runs": same}
    Path(a.out).write_text(json.dumps({"bench": "emulated_serving", "card": a.card, "busy_loops": a.loops,
                                       "method": "benchmarks/slow_host_serving.py", "summary": summary,
                                       "rows": rows}, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
