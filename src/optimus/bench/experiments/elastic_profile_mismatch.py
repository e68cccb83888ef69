"""The elastic controller planning on a latency profile that is wrong about the device, in
closed loop on the simulator (CPU only, about a minute): how far below the best single policy
it settles, which sizes it runs, and what its online correction learned (a scale of the
profile's flat part, a stretch of its token axis, and, when the steps demand it, a scale of its
slope past the knee).

The device is the H200 hinge of the SDAR-8B shape used by the regime tests (5.5 ms flat to about
100 rows, then 23 us per row); the profiles are that hinge with its knee moved (the slope kept),
the knee halved with the slope doubled, and the whole curve 3x slow. A stretch ``k`` maps the
profile's knee ``K`` to ``k K`` and its slope ``b`` to ``b / k``, so it repairs the second case
exactly and the third needs only the scale, but no scale and stretch give a knee moved at the
same slope: the fit compromises, over-predicting small steps.

  PYTHONPATH=src python -m optimus.bench.experiments.elastic_profile_mismatch --out mismatch.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from optimus.decoding import regimes
from optimus.policy.elastic.controller import ElasticPolicy
from optimus.policy.elastic.latency import LatencyProfile
from optimus.policy.registry import make_policy
from optimus.policy.simulate import KneeDevice, ReplayTable, SimConfig, Simulator, simulate

DEVICE = KneeDevice(t0=0.0055, knee=100, slope=2.3e-5, noise=0.05)
PROFILES = {  # name -> (t0, knee, slope) of the hinge the controller plans on
    "right": (DEVICE.t0, DEVICE.knee, DEVICE.slope),
    "knee 2.56x too far": (DEVICE.t0, 256, DEVICE.slope),
    "knee 5.12x too far": (DEVICE.t0, 512, DEVICE.slope),
    "knee 10.24x too far": (DEVICE.t0, 1024, DEVICE.slope),
    "knee 2x too near, slope 2x": (DEVICE.t0, DEVICE.knee / 2, 2 * DEVICE.slope),
    "3x too slow": (3 * DEVICE.t0, DEVICE.knee, 3 * DEVICE.slope),
}
SINGLE = ("ar", "fixed:2", "fixed:4", "fixed:8", "fixed:16")


def measure(regime: str, loads: tuple[int, ...], steps: int, warmup: int) -> list[dict]:
    table = ReplayTable(regimes.load(regime))
    prior = regimes.load(regime).window_tau()
    rows = []
    for load in loads:
        cfg = SimConfig(num_requests=load, gen_len=256, prompt_len=256, steps=steps, warmup_steps=warmup)
        single = {name: simulate(make_policy(name), cfg, table, DEVICE).throughput for name in SINGLE}
        best = max(single, key=single.get)
        for name, (t0, knee, slope) in PROFILES.items():
            policy = ElasticPolicy(profile=LatencyProfile.synthetic(t0, knee, slope), tau_prior=prior)
            result = Simulator(policy, cfg, table, DEVICE).run()
            rows.append({"requests": load, "profile": name, "elastic_tok_s": result.throughput,
                         "best_single": best, "best_single_tok_s": single[best],
                         "elastic_over_best": result.throughput / single[best],
                         "sizes": dict(sorted(result.size_histogram().items())),
                         "learned_scale": policy.correction.scale, "learned_stretch": policy.correction.stretch,
                         "learned_slope_ratio": policy.correction.slope_ratio})
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--acceptance", default="real-8b", help="acceptance regime the simulator replays")
    p.add_argument("--loads", default="16,64,256")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows = measure(args.acceptance, tuple(int(x) for x in args.loads.split(",")), args.steps, args.warmup_steps)
    for r in rows:
        sizes = ", ".join(f"{c}: {n}" for c, n in r["sizes"].items())
        print(f"{r['requests']:4d} requests, {r['profile']:<28} elastic {r['elastic_tok_s']:7.0f} tok/s = "
              f"{r['elastic_over_best']:.3f} x {r['best_single']} ({r['best_single_tok_s']:.0f}); scale "
              f"{r['learned_scale']:.2f}, stretch {r['learned_stretch']:.2f}, slope ratio "
              f"{r['learned_slope_ratio']:.2f}; windows by size {sizes}")
    device = {"t0_s": DEVICE.t0, "knee": DEVICE.knee, "slope_s_per_row": DEVICE.slope, "noise": DEVICE.noise}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"bench": "elastic_profile_mismatch", "acceptance": args.acceptance,
                                          "device": device, "steps": args.steps, "warmup_steps": args.warmup_steps,
                                          "rows": rows}, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
