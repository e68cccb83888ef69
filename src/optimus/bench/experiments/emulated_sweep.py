"""A GPU policy sweep replayed on a CPU: the engine's host side runs for real (scheduler,
policies, the regime's replayed commits), and each step occupies an emulated device for the
time that GPU took for steps of its rows and requests (the sweep's ``step_trace``,
:func:`optimus.bench.step_traces.profile_from_traces`). Elastic plans from a stored
latency surface, as on the GPU. What a controller change does at each load, judged in device
time (this CPU's host is not the GPU host's), before a GPU is free:

  PYTHONPATH=src python -m optimus.bench.experiments.emulated_sweep SWEEP.json \\
      --profile benchmarks/results/h100/latency_surface/latest.json --out emulated.json

Loads run in the sweep's order on one engine per policy (a controller keeps what it learned
from one load to the next), each the median of ``--repeats`` runs after a warm-up run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from optimus.bench import host_time
from optimus.bench.decision_trace import DecisionTrace
from optimus.bench.policy_sweep import TRACED
from optimus.bench.step_traces import profile_from_traces, sweep_rows
from optimus.config import SchedulerConfig
from optimus.engine.emulated import EmulatedDevice
from optimus.policy.elastic.graph_buckets import GraphBuckets
from optimus.policy.elastic.latency import LatencyProfile

POLICIES = "ar,fixed:2,fixed:4,fixed:8,fixed:16,fixed:32,elastic"


def run_policy(policy: str, loads: list[int], device: LatencyProfile, plan: LatencyProfile, shape: str,
               acceptance: str, prompt_len: int, gen_len: int, repeats: int,
               graph_max_tokens: int | None = None, refresh_waves: tuple[int, int] | None = None) -> list[dict]:
    """One engine for ``policy`` through every load: device tok/s of each timed run.
    ``graph_max_tokens``: the GPU run's CUDA-graph limit, so elastic prices steps at their
    graph buckets as it did there (a CPU engine has no graphs)."""
    # the GPU sweep's engine: the default step budget, so prompts are admitted as there
    engine = host_time._engine("elastic" if policy == TRACED else policy, shape, max(loads), prompt_len, gen_len,
                               acceptance, plan, token_budget=SchedulerConfig().max_tokens_per_step)
    if refresh_waves is not None:
        engine.scheduler.refresh_waves.max_wait, engine.scheduler.refresh_waves.min_decoders = refresh_waves
    trace = DecisionTrace(engine.policy) if policy == TRACED else None
    if graph_max_tokens and hasattr(engine.policy, "buckets"):
        engine.policy.buckets = GraphBuckets(graph_max_tokens)
    emulated = EmulatedDevice(device, engine.tokenizer.vocab_size).attach(engine)
    rows, added = [], 0
    for n in loads:
        runs = []
        for run in range(repeats + 1):  # run 0 warms up, as the GPU sweep's
            busy, steps, chunks = emulated.busy_s, engine.stats.steps, dict(engine.stats.chunk_size_counts)
            if trace:
                trace.start()
            host_time.add_random_requests(engine, n, prompt_len, gen_len, seed=run, first_id=added)
            added += n
            while engine.has_work():
                engine.step()
            if run:
                counts = engine.stats.chunk_size_counts
                runs.append({"device_tok_s": n * gen_len / (emulated.busy_s - busy),
                             "steps": engine.stats.steps - steps,
                             "chunk_sizes": {c: k - chunks.get(c, 0) for c, k in sorted(counts.items())
                                             if k - chunks.get(c, 0)},
                             **({"decisions": trace.runs[-1]} if trace else {})})
        median = sorted(runs, key=lambda r: r["device_tok_s"])[(len(runs) - 1) // 2]
        rows.append({"policy": policy, "concurrency": n, **median,
                     "device_tok_s_runs": [r["device_tok_s"] for r in runs]})
        if trace:  # every run's decisions, in run order
            rows[-1]["decisions"] = [r["decisions"] for r in runs]
        print(f"  {policy:9s} {n:4d} requests: {median['device_tok_s']:8.0f} device tok/s "
              f"(runs {', '.join(f'{r:.0f}' for r in rows[-1]['device_tok_s_runs'])}), {median['steps']} steps",
              flush=True)
    return rows


def elastic_vs_best(rows: list[dict]) -> dict[int, float]:
    """Per load: elastic's device tok/s over the best single policy's."""
    out = {}
    for n in sorted({r["concurrency"] for r in rows}):
        at = {r["policy"]: r["device_tok_s"] for r in rows if r["concurrency"] == n}
        elastic = at.get("elastic", at.get(TRACED))
        single = [v for p, v in at.items() if not p.startswith("elastic")]
        if elastic is not None and single:
            out[n] = elastic / max(single)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", nargs="+", help="JSON files of `optimus bench offline` sweeps with step traces")
    p.add_argument("--profile", required=True, help="the latency surface elastic plans from")
    p.add_argument("--policies", default=POLICIES)
    p.add_argument("--loads", default=None, help="comma list (default: the sweeps' loads, in order)")
    p.add_argument("--shape", default=None, help="model shape (default: the sweeps')")
    p.add_argument("--acceptance", default="real-8b", help="the regime the commits replay")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--graph-max-tokens", type=int, default=None,
                   help="the GPU run's CUDA-graph limit (elastic then prices steps at their buckets, as there)")
    p.add_argument("--refresh-waves", default=None,
                   help="WAIT,MIN_DECODERS: steps a due cache refresh may wait for a fuller step, from how many "
                        "decoders on (default: the scheduler's refresh_wave_wait and refresh_wave_min_decoders; "
                        "0,0: off)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    swept = sweep_rows(a.sweep)
    device, plan = profile_from_traces(swept), LatencyProfile.load(a.profile)
    loads = [int(n) for n in a.loads.split(",")] if a.loads else list(dict.fromkeys(r["concurrency"] for r in swept))
    shape = a.shape or swept[0].get("shape", "sdar-8b")
    waves = tuple(int(x) for x in a.refresh_waves.split(",")) if a.refresh_waves else None
    rows = [row for policy in a.policies.split(",")
            for row in run_policy(policy, loads, device, plan, shape, a.acceptance, a.prompt_len, a.gen_len, a.repeats,
                                   a.graph_max_tokens, waves)]
    ratios = elastic_vs_best(rows)
    for n, ratio in ratios.items():
        print(f"{n:4d} requests: elastic / best single policy in device time {ratio:.3f}")
    if a.out:
        Path(a.out).write_text(json.dumps({"bench": "emulated_sweep", "sweeps": a.sweep, "profile": a.profile,
                                           "shape": shape, "acceptance": a.acceptance, "rows": rows,
                                           "elastic_vs_best": ratios}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
