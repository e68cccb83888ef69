"""``optimus bench sweep``: for each chunk policy start a server, load it at each request rate,
stop it; report throughput, p99 latency and SLO attainment per rate, and each policy's
*capacity*: the highest swept rate at which at least ``attainment`` (90%) of the requests met
every SLO. Saves ``sweep.json`` and the plots of :mod:`optimus.bench.plots`."""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Sequence

from optimus.bench.datasets import add_dataset_arguments, dataset_spec_from_args, sample_requests
from optimus.bench.metrics import SLO
from optimus.bench.serve import add_load_arguments, benchmark, config_from_args, load_tokenizer, served_model_id

# Scalar keys kept per (policy, rate) in sweep.json (the per-request lists are dropped).
SUMMARY_KEYS = ("completed", "failed", "duration", "request_throughput", "output_throughput",
                "total_token_throughput", "request_goodput", "slo_attainment", "mean_ttft_ms", "median_ttft_ms",
                "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms",
                "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms", "total_output_tokens", "dllm",
                "request_latencies_ms")

Launcher = Callable[[str], ContextManager[str]]  # policy -> context yielding the server's base URL
Bench = Callable[[str, float], dict]  # (base URL, request rate) -> bench serve result


@dataclass(frozen=True)
class SweepConfig:
    policies: tuple[str, ...]
    rates: tuple[float, ...]
    slo: SLO
    attainment: float = 0.9

    def __post_init__(self) -> None:
        if not self.policies or not self.rates:
            raise ValueError("a sweep needs at least one policy and one rate")
        if self.slo.empty:
            raise ValueError("a sweep needs SLOs (--slo ttft:MS,tpot:MS) to judge capacity")
        if any(r <= 0 for r in self.rates):
            raise ValueError("rates must be > 0")


def capacity(runs: Sequence[dict], attainment: float) -> float | None:
    """Highest rate whose run kept at least ``attainment`` of its requests within the SLOs."""
    ok = [r["request_rate"] for r in runs if (r.get("slo_attainment") or 0.0) >= attainment]
    return max(ok) if ok else None


def run_sweep(cfg: SweepConfig, launch: Launcher, bench: Bench, log: Callable[[str], None] = print,
              on_policy: Callable[[dict], None] | None = None) -> dict:
    """``on_policy`` receives the sweep so far after each policy (a cut-off run keeps those)."""
    results: dict[str, dict] = {}
    for policy in cfg.policies:
        runs = []
        with launch(policy) as base_url:
            for rate in sorted(cfg.rates):
                full = bench(base_url, rate)
                runs.append({"request_rate": rate, **{k: full.get(k) for k in SUMMARY_KEYS}})
                log(_progress_line(policy, runs[-1]))
        results[policy] = {"runs": runs, "capacity": capacity(runs, cfg.attainment)}
        if on_policy is not None:
            on_policy(_sweep_dict(cfg, results))
    return _sweep_dict(cfg, results)


def _sweep_dict(cfg: SweepConfig, results: dict[str, dict]) -> dict:
    return {"slo_ms": cfg.slo.as_dict(), "attainment_target": cfg.attainment,
            "rates": sorted(cfg.rates), "policies": dict(results)}


def rejudge(sweep: dict, slo: SLO, attainment: float) -> dict:
    """The same runs judged against other SLOs: attainment per run and capacity per policy are
    recomputed from the stored per-request latencies."""
    policies = {}
    for policy, res in sweep["policies"].items():
        runs = [{**run, "slo_attainment": slo.attainment(run["request_latencies_ms"])} for run in res["runs"]]
        policies[policy] = {"runs": runs, "capacity": capacity(runs, attainment)}
    return {**sweep, "slo_ms": slo.as_dict(), "attainment_target": attainment, "policies": policies}


def _progress_line(policy: str, run: dict) -> str:
    return (f"[{policy:>9}] rate {run['request_rate']:6.2f} req/s: {run['output_throughput']:8.1f} tok/s, "
            f"p99 TTFT {run['p99_ttft_ms']:8.0f} ms, p99 TPOT {run['p99_tpot_ms']:7.1f} ms, "
            f"SLO attainment {run['slo_attainment']:.0%}, tokens/step {run['dllm'].get('tau', float('nan')):.2f}")


# ---- command line --------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="model directory, 'default', or random:SHAPE (random weights at a published shape: "
                             "pass --replay-acceptance in --server-args; see docs/benchmarks.md) (default: default)")
    parser.add_argument("--policies", default="ar,fixed:4,fixed:8,fixed:32,elastic",
                        help="comma-separated chunk policies (default: ar,fixed:4,fixed:8,fixed:32,elastic)")
    parser.add_argument("--rates", default="0.5,1,2,4", help="comma-separated request rates, req/s")
    parser.add_argument("--slo", required=True, help="SLOs judging capacity, e.g. ttft:2000,tpot:100")
    parser.add_argument("--attainment", type=float, default=0.9,
                        help="share of requests within SLOs that a rate needs to count (default: 0.9)")
    parser.add_argument("--server-args", default="", help="more `optimus serve` flags, one quoted string")
    parser.add_argument("--acceptance", default=None,
                        help="acceptance regime the servers replay (tasks, prose, smollm2-prose, real-8b, or a profile JSON): adds "
                             "--replay-acceptance and --acceptance-profile to --server-args")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for /health")
    parser.add_argument("--out-dir", required=True, help="sweep.json, the PNGs and server logs go here")
    parser.add_argument("--rejudge", default=None, metavar="SWEEP_JSON",
                        help="run nothing: judge a saved sweep against --slo and re-plot it into --out-dir")
    add_dataset_arguments(parser)
    add_load_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from optimus.bench.server_process import ServerLaunch, served

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = SweepConfig(tuple(p.strip() for p in args.policies.split(",") if p.strip()),
                      tuple(float(r) for r in args.rates.split(",") if r.strip()),
                      SLO.parse([args.slo]), args.attainment)
    if args.rejudge:
        sweep = rejudge(json.loads(Path(args.rejudge).read_text()), cfg.slo, cfg.attainment)
        sweep["rejudged_by"] = "optimus " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        return _save(sweep, out_dir)
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    requests = sample_requests(dataset_spec_from_args(args), tokenizer)
    # SIGTERM unwinds like Ctrl-C, so the `with served(...)` blocks stop their servers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    server_args = shlex.split(args.server_args)
    if args.acceptance:
        from optimus.decoding import regimes
        path = str(regimes.resolve(args.acceptance))
        server_args += ["--replay-acceptance", path, "--acceptance-profile", path]

    def launch(policy: str):
        return served(ServerLaunch(args.model, policy, tuple(server_args),
                                   startup_timeout_s=args.startup_timeout, log_dir=out_dir / "logs"))

    def bench(base_url: str, rate: float) -> dict:
        model = asyncio.run(served_model_id(base_url))
        bench_cfg = config_from_args(args, base_url, model, rate, cfg.slo)
        return asyncio.run(benchmark(bench_cfg, requests, lambda text: len(tokenizer.encode(text))))

    provenance = {"command": "optimus " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                  "dataset": vars(dataset_spec_from_args(args))}

    def save_partial(sweep: dict) -> None:  # plots come once, at the end
        (out_dir / "sweep.json").write_text(json.dumps({**sweep, **provenance, "partial": True}, indent=1))

    sweep = run_sweep(cfg, launch, bench, on_policy=save_partial)
    return _save({**sweep, **provenance}, out_dir)


def _save(sweep: dict, out_dir: Path) -> int:
    from optimus.bench.plots import plot_sweep

    (out_dir / "sweep.json").write_text(json.dumps(sweep, indent=1))
    for path in plot_sweep(sweep, out_dir):
        print(f"wrote {path}")
    for policy, res in sweep["policies"].items():
        print(f"capacity {policy:>9}: {res['capacity'] if res['capacity'] is not None else 'below every rate'}")
    return 0
