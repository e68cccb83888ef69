"""``optimus bench http``: what serving over HTTP costs against the engine alone.

For each policy and concurrency N, the same closed-loop load (N clients, each keeping one
request in flight, request rate inf; ``waves x N`` requests of ``input-len`` prompt tokens and
exactly ``output-len`` answer tokens, after unmeasured waves of N until one captures no CUDA
graph, so lazy captures stay out of both measurements) runs twice:

- in-process: the engine driven directly, detokenizing every output as a server does
  (``closed_loop``);
- over HTTP: ``optimus serve`` started by this command with the same engine flags, streaming
  clients (``bench serve``'s client, spread over processes: ``client_pool``), the step times
  read from the server's ``/metrics``.

Each row reports both, ``http_over_engine`` (HTTP output tok/s over in-process output tok/s),
TTFT and TPOT p50/p99, and the engine process's mean step wall time next to the in-process
one. Writes ``http_vs_engine.json``, prints a table and plots ``http_vs_engine.png`` in
``--out``. The in-process engine is freed before the server starts (one model on the device)."""

from __future__ import annotations

import argparse
import gc
import json
import random
import shlex
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from optimus.bench.client import RequestOptions
from optimus.bench.client_pool import ClientPool, default_procs
from optimus.bench.datasets import SampleRequest
from optimus.bench.metrics import SLO, compute_metrics
from optimus.bench.prometheus import counter_deltas, parse_prometheus
from optimus.bench.server_process import ServerLaunch, served

KEYS = ("output_tok_s", "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms", "mean_step_ms", "steps")


def prompts_for(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, max(101, vocab - 1000)) for _ in range(length)] for _ in range(count)]


def engine_config_for(model: str, policy: str, engine_args: str):
    from optimus.commands.serve import add_arguments
    from optimus.config import EngineConfig, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(EngineConfig, parser.parse_args(["--model", model, "--policy", policy,
                                                             *shlex.split(engine_args)]))


def warm_up(run_wave: Callable[[int], float], max_waves: int) -> int:
    """Runs unmeasured waves ``run_wave(1), run_wave(2), ...`` (each returns the seconds it spent
    capturing CUDA graphs) until one captured nothing, at most ``max_waves``; how many ran.
    A lazy capture stalls the step that meets a new bucket, so a measured run after a wave that
    captured nothing is unlikely to pay for captures on either side."""
    for k in range(1, max_waves + 1):
        if run_wave(k) == 0:
            return k
    return max_waves


def run_inprocess(args, policy: str) -> tuple[dict[int, dict], int]:
    """Rows by concurrency, and the model's vocabulary size (the HTTP run draws prompts from it)."""
    from optimus.bench.closed_loop import run_closed_loop
    from optimus.core.params import SamplingParams
    from optimus.engine.engine import Engine

    engine = Engine(engine_config_for(args.model, policy, args.engine_args))
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    vocab = engine.spec.arch.vocab_size
    rows = {}
    for n in args.concurrency:
        def wave(k: int, n: int = n) -> float:
            prompts = prompts_for(n, args.input_len, vocab, seed=1000 * k + n)
            return run_closed_loop(engine, prompts, params, n)["graph_capture_s"]

        warmed = warm_up(wave, args.warmup_waves)
        rows[n] = run_closed_loop(engine, prompts_for(args.waves * n, args.input_len, vocab, seed=n), params, n)
        rows[n]["warmup_waves"] = warmed
        print(f"  in-process {policy:8s} N={n:5d}: {rows[n]['output_tok_s']:9.0f} tok/s, "
              f"step {rows[n]['mean_step_ms']:.2f} ms, capture {rows[n]['graph_capture_s']:.2f} s", flush=True)
    del engine
    _free()
    return rows, vocab


def _free() -> None:
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def run_http(args, policy: str, vocab: int, out_dir: Path, on_row: Callable[[int, dict], None]) -> None:
    """Runs each concurrency over HTTP and hands its row to ``on_row(n, row)`` as soon as it is
    measured (a call cut short by its time limit keeps the rows it finished)."""
    launch = ServerLaunch(args.model, policy, tuple(shlex.split(args.engine_args) + shlex.split(args.server_args)
                                                   + ["--log-level", "warning"]),
                          startup_timeout_s=args.startup_timeout, log_dir=out_dir / "logs")
    pool = ClientPool(args.client_procs or max(default_procs(n) for n in args.concurrency))
    try:
        with served(launch) as url:
            model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
            for n in args.concurrency:
                row = _http_row(args, url, RequestOptions(model, ignore_eos=True), pool, n, vocab)
                print(f"  http       {policy:8s} N={n:5d}: {row['output_tok_s']:9.0f} tok/s, "
                      f"step {row['mean_step_ms']:.2f} ms, capture {row['graph_capture_s']:.2f} s, "
                      f"{row['failed']} failed", flush=True)
                on_row(n, row)
    finally:
        pool.close()


def _http_row(args, url: str, options: RequestOptions, pool: ClientPool, n: int, vocab: int) -> dict:
    def wave(k: int) -> float:
        before = _metrics(url)
        pool.run(url, options, _requests(n, args, vocab, seed=1000 * k + n), n, args.timeout)
        return counter_deltas(before, _metrics(url)).get("optimus_graph_capture_seconds_total", 0.0)

    warmed = warm_up(wave, args.warmup_waves)
    before = _metrics(url)
    results, duration = pool.run(url, options, _requests(args.waves * n, args, vocab, seed=n), n, args.timeout)
    counters = counter_deltas(before, _metrics(url))
    result = compute_metrics(results, duration, SLO(), (50.0, 99.0))
    steps = counters.get("optimus_engine_steps_total", 0.0)
    step_s = counters.get("optimus_engine_step_seconds_total", 0.0)
    capture_s = counters.get("optimus_graph_capture_seconds_total", 0.0)
    return {"requests": len(results), "failed": result["failed"], "output_tokens": result["total_output_tokens"],
            "wall_s": duration, "output_tok_s": result["output_throughput"],
            "p50_ttft_ms": result["p50_ttft_ms"], "p99_ttft_ms": result["p99_ttft_ms"],
            "p50_tpot_ms": result["p50_tpot_ms"], "p99_tpot_ms": result["p99_tpot_ms"],
            "steps": int(steps), "mean_step_ms": 1e3 * step_s / steps if steps else 0.0, "graph_capture_s": capture_s,
            "warmup_waves": warmed, "client_procs": min(pool.procs, max(1, n // 64)),
            "errors": sorted({r.error for r in results if r.error})[:3]}


def _metrics(url: str) -> dict:
    return parse_prometheus(httpx.get(url + "/metrics", timeout=30).text)


def _requests(count: int, args, vocab: int, seed: int) -> list[SampleRequest]:
    return [SampleRequest(ids, len(ids), args.output_len) for ids in prompts_for(count, args.input_len, vocab, seed)]


def table(rows: list[dict]) -> str:
    head = (f"{'policy':9s} {'N':>5s} {'engine tok/s':>13s} {'http tok/s':>11s} {'http/engine':>11s} "
            f"{'step ms eng/http':>17s} {'capture s eng/http':>18s} {'TTFT p50/p99 ms (http)':>23s} "
            f"{'TPOT p50/p99 ms (http)':>23s} failed")
    lines = [head]
    for r in rows:
        e, h = r["inprocess"], r["http"]
        lines.append(f"{r['policy']:9s} {r['concurrency']:5d} {e['output_tok_s']:13.0f} {h['output_tok_s']:11.0f} "
                     f"{r['http_over_engine']:11.3f} {e['mean_step_ms']:8.2f}/{h['mean_step_ms']:<8.2f} "
                     f"{e['graph_capture_s']:8.2f}/{h['graph_capture_s']:<9.2f} "
                     f"{h['p50_ttft_ms']:11.1f}/{h['p99_ttft_ms']:<11.1f} {h['p50_tpot_ms']:11.2f}/"
                     f"{h['p99_tpot_ms']:<11.2f} {h['failed']}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['policy']}\nN={r['concurrency']}" for r in rows]
    x = range(len(rows))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 1.1 * len(rows) + 2), 7), sharex=True)
    w = 0.38
    top.bar([i - w / 2 for i in x], [r["inprocess"]["output_tok_s"] for r in rows], w, label="engine in-process")
    top.bar([i + w / 2 for i in x], [r["http"]["output_tok_s"] for r in rows], w, label="over HTTP (streaming)")
    for i, r in zip(x, rows):
        top.annotate(f"{r['http_over_engine']:.2f}", (i + w / 2, r["http"]["output_tok_s"]), ha="center",
                     va="bottom", fontsize=8)
    top.set_ylabel("output tok/s")
    top.set_title("same closed-loop load: engine alone vs over HTTP (label: http/engine)")
    top.legend(fontsize=8)
    bottom.bar([i - w / 2 for i in x], [r["inprocess"]["mean_step_ms"] for r in rows], w, label="in-process step")
    bottom.bar([i + w / 2 for i in x], [r["http"]["mean_step_ms"] for r in rows], w, label="engine-process step")
    bottom.set_ylabel("mean step wall time (ms)")
    bottom.set_xticks(list(x), labels, fontsize=8)
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model for both runs, e.g. random:sdar-8b on a GPU")
    p.add_argument("--policies", default="ar,fixed:8,elastic")
    p.add_argument("--concurrency", default="4,8", help="comma list of closed-loop clients N")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--waves", type=int, default=2, help="requests per client in a measured run")
    p.add_argument("--warmup-waves", type=int, default=3,
                   help="at most this many unmeasured waves (N requests each) before each measured run, "
                        "stopping after the first that captures no CUDA graph (0: none)")
    p.add_argument("--engine-args", default="", help="engine flags for both runs, e.g. '--device cpu --num-pages 512'")
    p.add_argument("--server-args", default="", help="more `optimus serve` flags, e.g. '--front-ends 2'")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--client-procs", type=int, default=None,
                   help="processes the HTTP clients run in (default: one per 128 streams, at most 8)")
    p.add_argument("--out", required=True, help="directory for http_vs_engine.json/.png and server logs")


def run(args: argparse.Namespace) -> int:
    args.concurrency = [int(x) for x in str(args.concurrency).split(",") if x]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "input_len": args.input_len, "output_len": args.output_len, "waves": args.waves,
              "max_warmup_waves": args.warmup_waves,
              "engine_args": args.engine_args, "server_args": args.server_args, "rows": []}
    t0 = time.perf_counter()
    for policy in args.policies.split(","):
        print(f"[{policy}]", flush=True)
        engine_rows, vocab = run_inprocess(args, policy)

        def on_row(n: int, h: dict, policy=policy, engine_rows=engine_rows) -> None:
            e = engine_rows[n]
            result["rows"].append({"policy": policy, "concurrency": n, "inprocess": e, "http": h,
                                   "http_over_engine": h["output_tok_s"] / e["output_tok_s"],
                                   "step_ms_http_over_engine": h["mean_step_ms"] / e["mean_step_ms"]
                                   if e["mean_step_ms"] else None})
            result["elapsed_s"] = time.perf_counter() - t0
            (out_dir / "http_vs_engine.json").write_text(json.dumps(result, indent=1))  # after each row

        run_http(args, policy, vocab, out_dir, on_row)
    print(table(result["rows"]))
    print(f"wrote {out_dir / 'http_vs_engine.json'} and {plot(result['rows'], out_dir / 'http_vs_engine.png')}")
    return 0 if all(r["http"]["failed"] == 0 for r in result["rows"]) else 1
