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
import gc
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from optimus.bench.shapes import SHAPES, random_model
from optimus.decoding import regimes
from optimus.decoding.replay import Acceptance, ReplayAcceptance, load_acceptance
from optimus.engine.flight import pipeline_rule
from optimus.engine.llm import LLM
from optimus.core.params import SamplingParams


@dataclass(frozen=True)
class Target:
    """Where the benchmark runs. ``tiny`` shrinks every shape (a CPU smoke run of the code)."""

    device: str = "cuda"
    tiny: bool = False
    quantization: str | None = None  # "fp8": projections kept in FP8 (models.fp8.quantize_model)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def llm(self, shape: str, policy: str, commit_rule=None, **options) -> LLM:
        """An engine over random weights at ``shape`` (bf16 on CUDA, fp32 elsewhere)."""
        dtype = torch.bfloat16 if self.cuda else torch.float32
        loaded = random_model(shape, device=self.device, dtype=dtype, tiny=self.tiny)
        if self.quantization == "fp8":
            from optimus.models.fp8 import quantize_model
            quantize_model(loaded.model)
        if self.tiny:
            options.setdefault("num_pages", 4096)
        if self.cuda:  # every decoding bucket captured before any timing starts
            options.setdefault("graph_precapture", True)
        return LLM(loaded=loaded, policy=policy, commit_rule=commit_rule, device=self.device, **options)

    def free_memory(self) -> None:
        """After ``del llm``: the 8B copy must be gone before the next one is built."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def _sync(llm: LLM) -> None:
    if llm.engine.device.type == "cuda":
        torch.cuda.synchronize()


def _prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 1000) for _ in range(length)] for _ in range(n)]


def timed_generate(llm: LLM, batch: int, prompt_len: int, gen_len: int, params: SamplingParams,
                   full_warmup: bool = False, warmup: bool = True, seed: int = 0) -> dict:
    """Time one batch. The warm-up (other prompts) compiles Triton kernels and captures CUDA
    graphs; ``full_warmup`` runs the whole workload once first, so every bucket the timed
    run meets is already captured (policies with varied chunk sizes meet more buckets).
    ``seed`` picks the prompts and re-seeds a replayed acceptance, so run i of every policy
    draws the same commits."""
    vocab = llm.engine.spec.arch.vocab_size
    if warmup:
        llm.generate(_prompts(batch if full_warmup else min(batch, 2), prompt_len, vocab, seed=1000), params)
    prompts = _prompts(batch, prompt_len, vocab, seed=seed)
    reseed = getattr(llm.engine.post.commit_rule, "reseed", None)
    if reseed is not None:  # a replayed acceptance: every policy's run i draws the same commits
        reseed(seed)
    llm.engine.stats.catch_up()  # the warm-up's last step counts there, not here
    chunks0 = dict(llm.engine.stats.chunk_size_counts)
    s0 = _snapshot(llm)
    _sync(llm)
    llm.engine.stats.trace = []
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    _sync(llm)
    wall = time.perf_counter() - t0
    llm.engine.stats.catch_up()
    trace, llm.engine.stats.trace = llm.engine.stats.trace, None
    s1 = _snapshot(llm)
    tokens = sum(len(o.token_ids) for o in outs)
    steps = s1["steps"] - s0["steps"]
    capture = s1["capture"] - s0["capture"]
    return {"batch": batch, "output_tokens": tokens, "wall_s": wall, "output_tok_s": tokens / wall,
            # One-time CUDA-graph captures (and the Triton compiles inside them) that fell in the
            # timed run; a server pays them once. The second rate leaves them out.
            "graph_capture_s": capture, "output_tok_s_excl_capture": tokens / max(wall - capture, 1e-9),
            "steps": steps, "mean_step_ms": 1e3 * (s1["lat"] - s0["lat"]) / max(steps, 1),
            "cpu_ms_per_step": 1e3 * (s1["cpu"] - s0["cpu"]) / max(steps, 1),
            # The steps' own time on the device (CUDA events around forward and pick) against the
            # wall: the ratio is how much host work and idling the device waited through.
            "device_ms_per_step": 1e3 * (s1["device"] - s0["device"]) / max(steps, 1),
            "wall_over_device": wall / max(s1["device"] - s0["device"], 1e-9),
            "preemptions": sum(o.stats.preemptions for o in outs), "kv_pages": llm.engine.allocator.num_pages,
            "tokens_computed": s1["computed"] - s0["computed"],
            "tokens_committed": s1["committed"] - s0["committed"],
            # Whole-sequence cache refreshes (dual / prefix cache): steps holding one, and their time.
            "refresh_steps": s1["refresh_steps"] - s0["refresh_steps"],
            "refresh_tokens": s1["refresh_tokens"] - s0["refresh_tokens"],
            "refresh_time_share": (s1["refresh_lat"] - s0["refresh_lat"]) / max(s1["lat"] - s0["lat"], 1e-9),
            "chunk_sizes": {c: n - chunks0.get(c, 0) for c, n in sorted(llm.engine.stats.chunk_size_counts.items())
                            if n - chunks0.get(c, 0)},
            "step_trace": step_trace(trace)}


def step_trace(trace: list) -> dict:
    """The run's steps, columns of equal length: rows computed, requests in the step, refresh
    rows and device ms (CUDA events; on a CPU, the launches): what an emulated device replays
    (``bench.step_traces.profile_from_traces``)."""
    rows, requests, refresh, _, device = zip(*trace) if trace else ((),) * 5
    return {"rows": list(rows), "requests": list(requests), "refresh_rows": list(refresh),
            "device_ms": [round(1e3 * d, 3) for d in device]}


def _median(runs: list[dict]) -> dict:
    """The run with the median throughput; every run's rate kept under ``output_tok_s_runs``."""
    row = dict(sorted(runs, key=lambda r: r["output_tok_s"])[(len(runs) - 1) // 2])
    row["output_tok_s_runs"] = [r["output_tok_s"] for r in runs]
    return row


def _snapshot(llm) -> dict:
    s = llm.engine.stats
    return {"steps": s.steps, "lat": s.step_latency_sum_s, "cpu": s.cpu_time_sum_s, "device": s.device_time_sum_s,
            "computed": s.tokens_computed, "committed": s.tokens_committed, "capture": s.graph_capture_s,
            "refresh_steps": s.refresh_steps, "refresh_tokens": s.refresh_tokens,
            "refresh_lat": s.refresh_step_latency_sum_s}


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
PIPELINED, AUTO_PIPELINED = "+pipeline", "+auto"


def run_sweep(target: Target, shape: str, policies, concurrencies, acceptance: Acceptance, prompt_len=256,
              gen_len=256, profile_path: str | None = None, on_row=None,
              acceptance_path: str | None = None, repeats: int = 1, acceptance_name: str = "default model") -> list[dict]:
    """Every policy on ONE engine (the same weights, graphs and replay), swapped in between
    runs and interleaved round by round, so clock and neighbour drift hit every policy alike:
    back-to-back runs of one policy spread by up to 30% on the H100 (docs/gpu.md). Each point
    is the median of ``repeats`` timed runs after one warm-up run per policy and concurrency.
    Each policy object lives through the whole sweep (elastic keeps what it learned, as in a
    server). ``acceptance_path`` (the profile the commits replay) seeds elastic's tau."""
    params = SamplingParams(max_tokens=gen_len, ignore_eos=True)
    llm = target.llm(shape, "fixed:32", commit_rule=ReplayAcceptance(acceptance), max_running=max(concurrencies),
                     block_size=32, profile_path=profile_path, acceptance_profile=acceptance_path)
    controllers = {name: _policy(llm, name.removesuffix(PIPELINED).removesuffix(AUTO_PIPELINED)) for name in policies}
    rules = {name: _pipeline_rule(llm, name) for name in policies}  # each keeps what it learned
    rows = []
    for n in concurrencies:
        runs: dict[str, list[dict]] = {name: [] for name in policies}
        for i in range(max(repeats, 1)):
            for name, policy in controllers.items():
                llm.engine.use_policy(policy)
                llm.engine.flights.pipeline = rules[name]
                runs[name].append(timed_generate(llm, n, prompt_len, gen_len, params, full_warmup=True,
                                                 warmup=i == 0, seed=i))
        for name in policies:
            r = _median(runs[name])
            r.update(shape=shape, policy=name, concurrency=n, acceptance=f"replayed ({acceptance_name})")
            print(f"  sweep {shape} {name:9s} conc={n:4d}: {r['output_tok_s']:.0f} tok/s "
                  f"(runs {', '.join(f'{x:.0f}' for x in r['output_tok_s_runs'])}; {r['graph_capture_s']:.2f} s "
                  f"of graph captures), {r['steps']} steps, {r['preemptions']} preemptions, cpu {r['cpu_ms_per_step']:.2f} "
                  f"ms/step, wall/device {r['wall_over_device']:.2f}",
                  flush=True)
            rows.append(r)
        if on_row:
            on_row(rows)
    del llm, controllers
    target.free_memory()
    return rows


def _pipeline_rule(llm: LLM, name: str):
    if name.endswith(PIPELINED):
        return pipeline_rule("2")
    if name.endswith(AUTO_PIPELINED):
        from optimus.policy.elastic.setup import load_or_profile
        profile = load_or_profile(llm.engine)
        return pipeline_rule("auto", profile.predict)
    return pipeline_rule("off")


def _policy(llm: LLM, name: str):
    """A fresh policy for ``llm``'s engine. "elastic-shared": elastic planning every request on
    the shared tau curve (no per-request confidence levels)."""
    from optimus.policy.elastic.setup import elastic_kwargs
    from optimus.policy.registry import make_policy

    if not name.startswith("elastic"):
        return make_policy(name)
    kwargs = elastic_kwargs(llm.engine)
    kwargs["per_request"] = name != "elastic-shared"
    kwargs["unit_steps_overlap"] = llm.engine.flights.overlaps_unit_steps
    return make_policy("elastic", **kwargs)


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
                   help="comma list of ar, fixed:C, elastic, elastic-shared (elastic on one shared tau curve); "
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
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="shrink the shapes (smoke-test the code, e.g. on CPU)")
    p.add_argument("--quantization", choices=("fp8",), default=None,
                   help="fp8: every projection's weight kept in FP8 e4m3 (per-channel scales), as serve --quantization")
    p.add_argument("--out", required=True, help="JSON file to write (sections are merged into it)")


def run(args: argparse.Namespace) -> int:
    target = Target(device=args.device, tiny=args.tiny, quantization=args.quantization)
    if target.cuda and not torch.cuda.is_available():
        raise ValueError("bench offline needs a CUDA device (or --device cpu --tiny for a smoke run)")
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result["device"] = torch.cuda.get_device_name() if target.cuda else "cpu (tiny smoke run)"
    result["torch"] = torch.__version__
    result["quantization"] = args.quantization
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
                                        repeats=args.repeats)
        else:
            raise ValueError(f"unknown experiment {exp!r}")
        result.setdefault("elapsed_s", {})[exp] = time.perf_counter() - t0
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    from optimus.bench.offline_plots import plot_offline
    for png in plot_offline(out, out.parent):
        print(f"wrote {png}")
    return 0
