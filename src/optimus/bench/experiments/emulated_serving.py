"""A serving load replayed in process on an emulated device: requests arrive as a Poisson
process at a rate (as ``optimus bench sweep`` sends them), the engine's host side runs for real
(scheduler, policy, the regime's replayed commits) and each step occupies an emulated device for
the time a stored latency surface gives. What a policy's choices cost at a request rate,
with no GPU and no HTTP:

  PYTHONPATH=src python -m optimus.bench.experiments.emulated_serving \\
      --profile benchmarks/results/h200/latency_surface/latest.json --rates 20,50

Per policy and rate: output tok/s, steps, mean wall ms per step, decoding windows per step,
the share of plans holding a window with more than one open position (its commits are not
known at launch, so the step cannot stay in flight while the next is planned), the share of
steps kept in flight, the device's busy share, and the mean time per output token of a
request after its first (TPOT).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from optimus.bench import host_time
from optimus.bench.arrivals import arrival_times
from optimus.engine.emulated import EmulatedDevice
from optimus.engine.flight import pipeline_rule
from optimus.policy.elastic.latency import LatencyProfile


class _PlanLog:
    """Wraps the scheduler's ``schedule``: per plan, its decoding windows and how many of them
    hold more than one open position."""

    def __init__(self, scheduler) -> None:
        self.windows: list[int] = []
        self.wide: list[int] = []
        inner = scheduler.schedule

        def schedule(*a, **kw):
            plan = inner(*a, **kw)
            decoding = [w for w in plan.works if w.window is not None]
            self.windows.append(len(decoding))
            self.wide.append(sum(int((~w.request.committed[w.window[0]:w.window[1]]).sum()) > 1 for w in decoding))
            return plan
        scheduler.schedule = schedule


def serve(policy: str, rate: float, device: LatencyProfile, requests: int = 256, prompt_len: int = 256,
          output_len: int = 256, acceptance: str = "real-8b", shape: str = "sdar-8b", seed: int = 0,
          plan: LatencyProfile | None = None) -> dict:
    """``requests`` arriving at ``rate`` per second (Poisson), each served to ``output_len``;
    elastic plans from ``plan`` (default: the device's own curve)."""
    plan = plan or device
    engine = host_time._engine(policy, shape, requests, prompt_len, output_len, acceptance, plan)
    engine.flights.pipeline = pipeline_rule("auto", plan.predict)
    emulated = EmulatedDevice(device, engine.tokenizer.vocab_size).attach(engine)
    plans = _PlanLog(engine.scheduler)
    arrivals = arrival_times(requests, rate, seed=seed)
    added, finished = 0, 0
    first_token: dict[str, float] = {}
    tpot: list[float] = []
    t0 = time.perf_counter()
    while finished < requests:
        now = time.perf_counter() - t0
        while added < requests and arrivals[added] <= now:
            host_time.add_random_requests(engine, 1, prompt_len, output_len, seed=seed + added, first_id=added)
            added += 1
        if not engine.has_work():
            if added == requests:
                break  # every request served (its last output already counted)
            time.sleep(max(0.0, arrivals[added] - now))
            continue
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.token_ids and out.request_id not in first_token:
                first_token[out.request_id] = now
            if out.finished:
                finished += 1
                tpot.append((now - first_token.get(out.request_id, now)) / max(len(out.token_ids) - 1, 1))
    t_end = time.perf_counter()
    wall = t_end - t0
    # device time inside [t0, t_end]: a step still queued at the end counts only its part before it
    busy_s = emulated.busy_s - max(0.0, emulated.free_at - t_end)
    while engine.has_work():  # a step launched before the last finish reported: completed and counted
        engine.step()
    windows, wide = np.array(plans.windows), np.array(plans.wide)
    steps = max(engine.stats.steps, 1)
    return {"policy": policy, "rate": rate, "requests": requests, "output_tok_s": requests * output_len / wall,
            "steps": steps, "wall_ms_per_step": 1e3 * wall / steps, "windows_per_step": float(windows.mean()),
            "plans_with_a_wide_window": float(np.mean(wide > 0)),
            "steps_kept_in_flight": engine.stats.steps_in_flight / steps,
            "device_busy_share": busy_s / wall, "mean_tpot_ms": 1e3 * float(np.mean(tpot))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", required=True,
                   help="the latency surface the emulated device follows (and elastic plans from)")
    p.add_argument("--device-profile", default=None,
                   help="the emulated device follows this curve instead (e.g. a card's step traces, "
                        "python -m optimus.bench.step_traces); elastic still plans from --profile")
    p.add_argument("--policies", default="ar,elastic")
    p.add_argument("--rates", default="20,50", help="comma list of request rates (per second)")
    p.add_argument("--requests", type=int, default=256, help="requests per rate")
    p.add_argument("--acceptance", default="real-8b")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    plan = LatencyProfile.load(args.profile)
    device = LatencyProfile.load(args.device_profile) if args.device_profile else plan
    rows = []
    for rate in (float(r) for r in args.rates.split(",")):
        for policy in args.policies.split(","):
            row = serve(policy, rate, device, args.requests, acceptance=args.acceptance, plan=plan)
            rows.append(row)
            print(f"{policy:<9} {rate:5.1f} req/s: {row['output_tok_s']:6.0f} tok/s, {row['steps']} steps of "
                  f"{row['wall_ms_per_step']:.1f} ms and {row['windows_per_step']:.1f} windows, wide plans "
                  f"{row['plans_with_a_wide_window']:.2f}, kept in flight {row['steps_kept_in_flight']:.2f}, "
                  f"device busy {row['device_busy_share']:.2f}, TPOT {row['mean_tpot_ms']:.1f} ms", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"bench": "emulated_serving", "profile": args.profile,
                                              "device_profile": args.device_profile or args.profile,
                                              "acceptance": args.acceptance, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
