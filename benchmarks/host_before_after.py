"""Host work per step, this tree against an earlier commit, alternated in one window.

This machine's speed drifts by up to 2x within minutes, so `optimus bench host` runs the two
trees in turn, round after round, and each value is the median over the rounds. The cases are
the stored ones (benchmarks/results/cpu/host_time): the SDAR-8B geometry at 256 requests under
`real-8b` (prompt and output 256, and output 2048 for ar and fixed:4), and the SmolLM2-135M shape
(a causal model) at 512 requests (prompt and output 128).

    python benchmarks/host_before_after.py --base 03c01f1 --rounds 3 --out host_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = (  # (bench host arguments, what the row adds to identify its case)
    (["--policies", "ar,fixed:4,fixed:32,elastic", "--requests", "256"], {}),
    (["--policies", "ar", "--requests", "512", "--shape", "smollm2-135m", "--prompt-len", "128",
      "--output-len", "128"], {"shape": "smollm2-135m", "prompt_len": 128, "output_len": 128}),
    (["--policies", "ar,fixed:4", "--requests", "256", "--output-len", "2048"], {"output_len": 2048}),  # long answers
)


def bench(src: Path, args: list[str], out: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-m", "optimus.cli", "bench", "host", "--acceptance", "real-8b", *args, "--out", str(out)]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["rows"]


def short_commit(ref: str) -> str:
    return subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()


def medians(runs: list[list[dict]], extra: dict) -> list[dict]:
    """One row per policy: each phase's median over the runs, and each run's total."""
    rows = []
    for same in zip(*runs):
        ms = [r["full_batch_ms"] for r in same]
        rows.append({"policy": same[0]["policy"], "requests": same[0]["requests"], **extra, "runs": len(ms),
                     "full_batch_ms": {k: round(statistics.median(m[k] for m in ms), 2) for k in ms[0]},
                     "full_batch_ms_runs": [round(m["total"], 2) for m in ms]})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the earlier commit")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    base, now = short_commit(a.base), short_commit("HEAD")
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), base], cwd=ROOT, check=True)
        try:
            runs: dict[str, list[list[list[dict]]]] = {"before": [[] for _ in CASES], "now": [[] for _ in CASES]}
            for i in range(a.rounds):
                for side, src in (("before", tree / "src"), ("now", ROOT / "src")):
                    for k, (args, _) in enumerate(CASES):
                        rows = bench(src, args, Path(tmp) / "rows.json")
                        runs[side][k].append(rows)
                        totals = ", ".join(f"{r['policy']} {r['full_batch_ms']['critical']:.2f}" for r in rows)
                        print(f"round {i + 1} {side:<6} critical ms: {totals}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    rows = {side: [row for k, (_, extra) in enumerate(CASES) for row in medians(runs[side][k], extra)]
            for side in runs}
    result = {"bench": "host_time", "shape": "sdar-8b", "acceptance": "real-8b", "prompt_len": 256, "output_len": 256,
              "method": f"benchmarks/host_before_after.py: optimus bench host at {now} alternated with {base} "
                        f"in one window, {a.rounds} rounds; each value the median of the runs",
              "rows": rows["now"], "before": {"commit": base, "rows": rows["before"]}}
    Path(a.out).write_text(json.dumps(result, indent=1))
    for b, n in zip(rows["before"], rows["now"]):
        print(f"{n['policy']:<9} {n['requests']} requests: total {b['full_batch_ms']['total']:.2f} -> "
              f"{n['full_batch_ms']['total']:.2f} ms, critical {b['full_batch_ms']['critical']:.2f} -> "
              f"{n['full_batch_ms']['critical']:.2f} ms")
    print(f"saved {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
