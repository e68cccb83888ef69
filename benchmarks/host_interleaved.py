"""Host work per step, this tree against an earlier commit, step by step in one process.

`host_before_after.py` alternates whole runs, and this machine's speed drifts by up to 2x within
minutes: a change of 5-10% drowns in it. Here the earlier commit's package is imported beside this
tree's (renamed `optimus_base`), each builds an engine for the same requests and replayed commits
(`optimus bench host`'s setup), and the two take their steps in turn. Both see the same drift, and
step i of one is step i of the other (the same plan and commits, as long as the change keeps token
behaviour), so the ratio of each pair's critical host time compares like with like; the result is
the median ratio. The absolute times run higher than `optimus bench host` alone (two engines share
the caches): read them beside each other only.

    python benchmarks/host_interleaved.py --base 7c66888 --requests 64,256 --out host_interleaved.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BASE_PACKAGE = "optimus_base"


def extract_base(commit: str, into: Path) -> None:
    """``commit``'s ``src/optimus`` as the package ``optimus_base`` under ``into`` (weights left out:
    the benchmark's model is random), its own imports renamed to match."""
    archive = subprocess.run(["git", "archive", commit, "src/optimus", ":(exclude)*.safetensors", ":(exclude)*.gguf"],
                             cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    package = into / BASE_PACKAGE
    (into / "src" / "optimus").rename(package)
    for path in package.rglob("*.py"):
        text = path.read_text()
        text = re.sub(r"\boptimus\.", f"{BASE_PACKAGE}.", text)
        text = re.sub(r"\b(from|import) optimus\b(?!_)", rf"\1 {BASE_PACKAGE}", text)
        path.write_text(text)


class Side:
    """One tree's engine under ``optimus bench host``'s setup, with its phase timers."""

    def __init__(self, package: str, policy: str, requests: int, args: argparse.Namespace) -> None:
        self.bench = importlib.import_module(f"{package}.bench.host_time")
        self.engine = self.bench._engine(policy, args.shape, requests, args.prompt_len, args.output_len, args.acceptance)
        self.timers = self.bench._time_phases(self.engine)
        self.bench.add_random_requests(self.engine, requests, args.prompt_len, args.output_len)
        self.requests, self.critical, self.steps = requests, [], 0

    def step(self) -> None:
        """One step; its critical host time kept where every request decodes (reports)."""
        for k in self.timers:
            self.timers[k] = 0.0
        t0 = time.perf_counter()
        outs = self.engine.step()
        wall = time.perf_counter() - t0
        self.steps += 1
        if len(outs) == self.requests:
            self.critical.append(wall - sum(self.timers[k] for k in self.bench.overlapped_phases(self.engine)))


def measure(policy: str, requests: int, args: argparse.Namespace) -> dict:
    base, new = Side(BASE_PACKAGE, policy, requests, args), Side("optimus", policy, requests, args)
    while base.engine.has_work() or new.engine.has_work():
        for side in (base, new):
            if side.engine.has_work():
                side.step()
    if base.steps != new.steps:  # elastic learns from the (host) step times; a fixed size must not differ
        print(f"{policy} at {requests} requests: {base.steps} steps before, {new.steps} now: pairs are by index",
              flush=True)
    n = min(len(base.critical), len(new.critical))
    b, a = np.array(base.critical[:n]), np.array(new.critical[:n])
    return {"policy": policy, "requests": requests, "steps_before": base.steps, "steps": new.steps, "pairs": n,
            "critical_ms_before": round(1e3 * float(np.median(b)), 3), "critical_ms_now": round(1e3 * float(np.median(a)), 3),
            "paired_ratio": round(float(np.median(a / b)), 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the earlier commit")
    p.add_argument("--requests", default="64,256")
    p.add_argument("--policies", default="ar,fixed:4,fixed:32,elastic")
    p.add_argument("--shape", default="sdar-8b")
    p.add_argument("--acceptance", default="real-8b")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()
    base = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        extract_base(base, Path(tmp))
        sys.path[:0] = [tmp, str(ROOT / "src")]
        rows = []
        for requests in map(int, args.requests.split(",")):
            for policy in args.policies.split(","):
                row = measure(policy, requests, args)
                rows.append(row)
                print(f"{policy:<9} {requests} requests: critical ms {row['critical_ms_before']:.2f} -> "
                      f"{row['critical_ms_now']:.2f}, paired median ratio {row['paired_ratio']:.3f} "
                      f"({row['pairs']} pairs)", flush=True)
    Path(args.out).write_text(json.dumps({
        "bench": "host_interleaved", "shape": args.shape, "acceptance": args.acceptance,
        "prompt_len": args.prompt_len, "output_len": args.output_len, "commit": head, "base": base,
        "method": f"benchmarks/host_interleaved.py: {head} against {base}, one process, steps in turn", "rows": rows},
        indent=1))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
