"""Where a policy's host time goes on the machine that drives the GPU: the offline policy sweep
with Python's profiler on during each policy's timed runs (model build, graph capture and the
other policies' runs left out), one profile per policy, written as text:

  PYTHONPATH=src python -m optimus.bench.experiments.host_profile --out DIR \\
      --shape llada2-mini --concurrency 64,256 --policies fixed:16,elastic \\
      --profile benchmarks/results/h100/policy_sweep_real8b_llada2/startup_profile_to_256_requests.json

The sweep's own numbers (``DIR/host_profile_sweep.json``) are slowed by the profiler; read the
profiles for shares, not the throughput. ``--timers`` leaves the profiler off and times the
step's phases instead (``DIR/host_phases.json``, ms per step per policy and load): what the
host spends in each, and the part of each step the device waited on the host. ``--device cpu
--tiny`` runs it on a CPU.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
from pathlib import Path

from optimus.bench import policy_sweep
from optimus.bench.experiments.host_phases import PhaseTimers
from optimus.bench.timed_runs import timed_generate
from optimus.cli import main as cli_main


class PolicyProfiles:
    """Wraps ``timed_generate``: each timed run profiled under its policy's name."""

    def __init__(self) -> None:
        self.profiles: dict[str, cProfile.Profile] = {}

    def __call__(self, llm, *args, **kwargs) -> dict:
        policy = llm.engine.scheduler.policy
        name = type(policy).__name__ + str(getattr(policy, "chunk", ""))
        profile = self.profiles.setdefault(name, cProfile.Profile())
        profile.enable()
        try:
            return timed_generate(llm, *args, **kwargs)
        finally:
            profile.disable()

    def report(self, lines: int = 45) -> str:
        """Per policy: the top ``lines`` functions by cumulative and by own time, then the
        policy's and the scheduler's own functions by cumulative time, whatever their rank
        (on a CPU smoke run the model's forward fills the top of the list)."""
        out = io.StringIO()
        for name, profile in self.profiles.items():
            for key, restrictions in (("cumulative", (lines,)), ("tottime", (lines,)),
                                      ("cumulative", (r"optimus/(policy|scheduler)/", lines))):
                text = io.StringIO()
                pstats.Stats(profile, stream=text).sort_stats(key).print_stats(*restrictions)
                heading = key if len(restrictions) == 1 else f"{key}, the policy's and scheduler's own"
                out.write(f"===== {name}, by {heading}\n{text.getvalue()}\n")
        return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--shape", default="llada2-mini")
    p.add_argument("--concurrency", default="64,256")
    p.add_argument("--policies", default="fixed:16,elastic")
    p.add_argument("--acceptance", default="real-8b")
    p.add_argument("--profile", default=None, help="the latency profile elastic plans from")
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--graph-max-tokens", type=int, default=2048)
    p.add_argument("--device", default=None, help="cpu (with --tiny) for a smoke run")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--timers", action="store_true", help="phase timers instead of the profiler")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    profiles = PhaseTimers() if args.timers else PolicyProfiles()
    policy_sweep.timed_generate = profiles
    try:
        sweep = ["bench", "offline", "--experiments", "sweep", "--sweep-shape", args.shape,
                 "--gen-len", str(args.gen_len), "--acceptance", args.acceptance, "--concurrency", args.concurrency,
                 "--repeats", "1", "--policies", args.policies, "--out", str(args.out / "host_profile_sweep.json")]
        sweep += ["--profile", args.profile] if args.profile else []
        sweep += ["--device", args.device] if args.device else []
        sweep += ["--tiny"] if args.tiny else ["--graph-max-tokens", str(args.graph_max_tokens)]
        rc = cli_main(sweep)
    finally:
        policy_sweep.timed_generate = timed_generate
    path = args.out / ("host_phases.json" if args.timers else "host_profile.txt")
    path.write_text(profiles.report())
    print(f"wrote {path}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
