"""`optimus bench offline`: engine throughput at published 8B shapes on random weights.

Experiments (each writes a section of one JSON file):
- ``surface``: step latency T(batch, chunk) with a cached context, its fit and knee;
- ``schedule4``: the DESIGN.md reference schedule: prompt 256, generation 256, block 32,
  chunk 32, exactly 4 tokens committed per step, at several batch sizes;
- ``ar``: autoregressive decoding (a causal Llama shape and/or the dLLM at C = 1);
- ``sweep``: policies x concurrency with token efficiency replayed from a measured
  acceptance profile (the shipped default model's), labelled as such;
- ``matmul``: forward pass at 8192 tokens against the card's measured bf16 matrix rate.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from optimus.bench.shapes import SHAPES
from optimus.bench.policy_sweep import run_sweep
from optimus.bench.timed_runs import Target, timed_generate
from optimus.decoding import regimes
from optimus.decoding.replay import load_acceptance
from optimus.core.params import SamplingParams


def run_surface(target: Target, shape: str, batches, chunks, context: int, profile_out: str | None = None) -> dict:
    from optimus.policy.elastic.latency import LatencyProfile
    from optimus.executor.timed_step import make_step_fn

    # Each point warms up (captures) its own bucket first; pre-capturing them all would only
    # lengthen the start.
    llm = target.llm(shape, "fixed:32", max_running=max(batches), graph_precapture=False)
    step = make_step_fn(llm.engine, context=context, repeats=5)
    points = []
    for b in batches:
        for c in chunks:
            if b * c > 16384:
                continue
            step(b, c)  # warm-up / graph capture
            points.append({"batch": b, "chunk": c, "tokens": b * c, "seconds": step(b, c)})
            print(f"  surface {shape} batch={b:4d} chunk={c:3d}: {1e3 * points[-1]['seconds']:.2f} ms", flush=True)
    from optimus.policy.elastic.setup import device_name, model_id

    profile = LatencyProfile.from_pairs([(p["tokens"], p["seconds"], p["batch"]) for p in points],
                                        device=device_name(llm.engine.device), model_id=model_id(llm.engine))
    if profile_out:
        profile.save(profile_out)
    del llm, step  # the step function holds the engine: its KV cache would shrink the next engine's
    target.free_memory()
    return {"shape": shape, "context": context, "points": points, "knee_tokens": float(profile.knee)}


def run_schedule4(target: Target, shape: str, batches, prompt_len=256, gen_len=256,
                  cache_modes=("auto",), **options) -> list[dict]:
    """``cache_modes``: full-attention shapes run once per mode; each row reports the share of
    step time spent in steps that hold a whole-sequence refresh. ``options``: more engine
    options (e.g. ``graph_max_tokens``)."""
    params = SamplingParams(max_tokens=gen_len, rule="topk", tokens_per_step=4, ignore_eos=True)
    rows = []
    for mode in cache_modes:
        # Budget for a whole batch's refresh in one step, as the published loop runs it.
        budget = max(4096, max(batches) * (prompt_len + gen_len))
        llm = target.llm(shape, "fixed:32", max_running=max(batches), block_size=32, cache_mode=mode,
                         max_tokens_per_step=budget, **options)
        for b in batches:
            r = timed_generate(llm, b, prompt_len, gen_len, params, full_warmup=True)
            r.update(shape=shape, policy="fixed:32", schedule="4 tokens/step",
                     cache_mode=llm.engine.scheduler.scheme.name)
            print(f"  schedule4 {shape} {r['cache_mode']} batch={b}: {r['output_tok_s']:.0f} tok/s, step "
                  f"{r['mean_step_ms']:.2f} ms, refresh steps {r['refresh_steps']} taking "
                  f"{100 * r['refresh_time_share']:.0f}% of step time, cpu {r['cpu_ms_per_step']:.2f} ms/step",
                  flush=True)
            rows.append(r)
        del llm
        target.free_memory()
    return rows


def run_ar(target: Target, shape: str, batches, prompt_len=256, gen_len=256) -> list[dict]:
    params = SamplingParams(max_tokens=gen_len, rule="topk", tokens_per_step=1, ignore_eos=True)
    llm = target.llm(shape, "ar", max_running=max(batches))
    rows = []
    for b in batches:
        r = timed_generate(llm, b, prompt_len, gen_len, params, full_warmup=True)
        r.update(shape=shape, policy="ar")
        print(f"  ar {shape} batch={b}: {r['output_tok_s']:.0f} tok/s, step {r['mean_step_ms']:.2f} ms", flush=True)
        rows.append(r)
    del llm
    target.free_memory()
    return rows


# A sweep policy name ending so runs pipelined (engine.flights): at every load, or where the
# device's latency curve says halves pay (runner.pipeline "auto").
def run_matmul(target: Target, shape: str, tokens: int = 8192) -> dict:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    mm_tflops = 10 * 2 * 8192 ** 3 / (time.perf_counter() - t0) / 1e12
    del a, b
    from optimus.executor.timed_step import make_step_fn

    llm = target.llm(shape, "fixed:32", max_running=64, graph_max_tokens=1024, graph_precapture=False)
    step = make_step_fn(llm.engine, context=512, repeats=5)
    step(8, tokens // 8)
    seconds = step(8, tokens // 8)
    arch = llm.engine.spec.arch
    params = sum(p.numel() for n, p in llm.engine.loaded.model.named_parameters() if "embed_tokens" not in n)
    layers, heads, d = arch.num_layers, arch.num_heads, arch.head_dim
    q_per_req, kv_len = tokens // 8, 512 + tokens // 8
    attn = 4 * layers * heads * d * 8 * q_per_req * kv_len
    flops = 2 * params * tokens + attn
    del llm, step  # as in run_surface: the step function holds the engine
    target.free_memory()
    return {"shape": shape, "tokens": tokens, "seconds": seconds, "tflops": flops / seconds / 1e12,
            "matmul_tflops": mm_tflops, "fraction_of_matmul": flops / seconds / 1e12 / mm_tflops}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiments", default="surface,schedule4,ar,matmul,sweep",
                   help="comma list of surface, schedule4, ar, sweep, matmul")
    p.add_argument("--dllm-shape", default="llada-8b", choices=sorted(SHAPES))
    p.add_argument("--sweep-shape", default="sdar-8b", choices=sorted(SHAPES))
    p.add_argument("--ar-shapes", default="llama-8b,llada-8b")
    p.add_argument("--cache-modes", default="auto",
                   help="schedule4: comma list of cache modes to run (full-attention shapes), e.g. "
                        "dual-cache,prefix-cache,prefix-block")
    p.add_argument("--batches", default="1,8,32,128")
    p.add_argument("--concurrency", default="1,8,32,128,256")
    p.add_argument("--policies", default="ar,fixed:4,fixed:8,fixed:16,fixed:32,fixed:64,elastic",
                   help="comma list of ar, fixed:C, elastic, elastic-shared (elastic on one shared tau curve), "
                        "elastic-profile (on its latency profile, never corrected online), elastic-traced (its every "
                        "decision recorded in the row's decisions); "
                        "NAME+pipeline runs NAME with the running requests in two pipelined halves, NAME+auto pipelined "
                        "where the device's latency curve says halves pay")
    p.add_argument("--acceptance", default=None,
                   help="acceptance regime the sweep replays: tasks, prose, smollm2-prose, real-8b (decoding/regimes.py), or a "
                        "profile JSON (optimus bench acceptance)")
    p.add_argument("--profile", default=None,
                   help="latency-profile JSON: written by the surface experiment, read by elastic in the sweep")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens per request (schedule4, ar, sweep)")
    p.add_argument("--gen-len", type=int, default=256, help="generated tokens per request (schedule4, ar, sweep)")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed runs per sweep point (after one warm-up); the median is reported")
    p.add_argument("--drop-below", type=float, default=None, metavar="FRACTION",
                   help="sweep: after each load, leave out of the higher loads every ar/fixed:C policy below FRACTION "
                        "of that load's best single policy at a larger chunk than the best's (it only falls further "
                        "behind as load grows); default: run every policy at every load")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="shrink the shapes (smoke-test the code, e.g. on CPU)")
    p.add_argument("--quantization", choices=("fp8",), default=None,
                   help="fp8: every projection's weight kept in FP8 e4m3 (per-channel scales), as serve --quantization")
    p.add_argument("--graph-max-tokens", type=int, default=None,
                   help="largest step served from a CUDA graph (default: the engine's); MoE shapes run larger "
                        "steps eagerly, about 1,300 launches a step (docs/models.md)")
    p.add_argument("--refresh-wave-wait", type=int, default=None,
                   help="dual and prefix cache: steps a due refresh may wait for others (default: the scheduler's "
                        "refresh_wave_wait; 0: off)")
    p.add_argument("--out", required=True, help="JSON file to write (sections are merged into it)")


def run(args: argparse.Namespace) -> int:
    target = Target(device=args.device, tiny=args.tiny, quantization=args.quantization,
                    graph_max_tokens=args.graph_max_tokens, refresh_wave_wait=args.refresh_wave_wait)
    if target.cuda and not torch.cuda.is_available():
        raise ValueError("bench offline needs a CUDA device (or --device cpu --tiny for a smoke run)")
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result["device"] = torch.cuda.get_device_name() if target.cuda else "cpu (tiny smoke run)"
    result["torch"] = torch.__version__
    result["quantization"] = args.quantization
    result["graph_max_tokens"] = args.graph_max_tokens
    result["refresh_wave_wait"] = args.refresh_wave_wait
    for exp in args.experiments.split(","):
        t0 = time.perf_counter()
        print(f"[{exp}]", flush=True)
        if exp == "surface":
            result["surface"] = run_surface(target, args.sweep_shape, [1, 8, 32, 64, 128, 256], [1, 4, 8, 16, 32], 512,
                                            args.profile)
        elif exp == "schedule4":
            result["schedule4"] = run_schedule4(target, args.dllm_shape, ints(args.batches), args.prompt_len,
                                                args.gen_len, cache_modes=args.cache_modes.split(","))
        elif exp == "ar":
            result["ar"] = [r for s in args.ar_shapes.split(",")
                            for r in run_ar(target, s, ints(args.batches), args.prompt_len, args.gen_len)]
        elif exp == "matmul":
            if not target.cuda:
                raise ValueError("the matmul experiment measures a CUDA card")
            result["matmul"] = run_matmul(target, args.dllm_shape)
        elif exp == "sweep":
            if not args.acceptance:
                raise ValueError("the sweep needs --acceptance (tasks, prose, smollm2-prose, real-8b, or a profile JSON)")
            acceptance_path = str(regimes.resolve(args.acceptance))
            def save_partial(rows):
                result["sweep"] = rows
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=2))
            result["sweep"] = run_sweep(target, args.sweep_shape, args.policies.split(","), ints(args.concurrency),
                                        load_acceptance(acceptance_path), args.prompt_len, args.gen_len,
                                        profile_path=args.profile,
                                        on_row=save_partial, acceptance_path=acceptance_path,
                                        acceptance_name=args.acceptance,
                                        repeats=args.repeats, drop_below=args.drop_below)
        else:
            raise ValueError(f"unknown experiment {exp!r}")
        result.setdefault("elapsed_s", {})[exp] = time.perf_counter() - t0
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    from optimus.bench.offline_plots import plot_offline
    for png in plot_offline(out, out.parent):
        print(f"wrote {png}")
    return 0
