"""``optimus bench host``: the engine's host work per step at many requests, with the device
left out. The forward returns zeros and the greedy pick draws random tokens and confidences,
so a step's wall time is its host work alone: planning (scheduler, the policy's choice), the
batch build, the commit (a replayed acceptance regime decides how many positions each window
commits), the finish checks, the cache cursors, the outputs and the policy learning from the
step. The outputs and the learning run after the next forward is queued (with overlap, the
whole completion of the step before does), so on a GPU they hide behind it: ``critical`` is
the rest, the host work the device waits for between two steps (with the pipeline off). The GPU
benchmarks report the same work as ``cpu_ms_per_step`` next to real steps.

``--emulate-device`` measures what the engine hides instead: each step occupies an emulated
device for the time an 8B-shape latency curve gives (``EMULATED_8B``), queued as on a GPU, and
each policy runs synchronously, pipelined from ``--pipeline-min-running`` requests on, and with
``--pipeline auto`` (halves when the curve says they pay). Reported over the
steps where every request decodes: wall time against device busy time (``wall_over_device``,
1.0 = the host hidden entirely) and output tok/s.
Runs on any machine (CPU)."""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from optimus.engine.emulated import EmulatedDevice
from optimus.config import engine_config
from optimus.core.params import SamplingParams
from optimus.core.request import RequestState
from optimus.decoding import regimes
from optimus.engine.engine import Engine
from optimus.engine.flight import pipeline_rule
from optimus.policy.elastic.latency import LatencyProfile

PHASES = ("schedule", "build", "commit", "settle", "cursors", "outputs", "learning")
# An 8B step on one H200-class card: ~11 ms flat to 256 tokens, then 40 us per token.
EMULATED_8B = LatencyProfile.synthetic(0.011, 256, 4e-5)


def overlapped_phases(engine: Engine) -> tuple[str, ...]:
    """The phases of the step just run that ran while the device computed the step it
    launched: the outputs and the learning; when that step stays in flight with its commits
    assumed (overlap), the whole completion of the step before as well."""
    if engine._in_flight is not None and engine._in_flight.assumed:
        return "commit", "settle", "cursors", "outputs", "learning"
    return "outputs", "learning"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="sdar-8b", help="model shape (tiny random weights: only the geometry counts)")
    p.add_argument("--requests", default="256", help="comma list of running-request counts")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--policies", default="ar,fixed:4,fixed:32,elastic")
    p.add_argument("--acceptance", default="real-8b", help="acceptance regime or profile JSON (replayed)")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--emulate-device", action="store_true",
                   help="steps queue on an emulated 8B-shape device: wall time against device time, sync and pipelined")
    p.add_argument("--pipeline-min-running", type=int, default=64, help="the pipelined runs' threshold")
    p.add_argument("--emulated-curve", default="0.011,256,4e-5",
                   help="emulated: the device's hinge as T0,KNEE,SLOPE (seconds flat to KNEE tokens, then "
                        "SLOPE seconds a token); the default is an 8B step on an H200-class card")
    p.add_argument("--pipelines", default=None,
                   help="emulated: comma list of off | N | auto to run each policy with (default: off, "
                        "--pipeline-min-running and auto)")


def run(args: argparse.Namespace) -> int:
    if args.emulate_device:
        return _run_emulated(args)
    rows = [measure(policy, args.shape, requests, args.prompt_len, args.output_len, args.acceptance)
            for requests in _loads(args) for policy in args.policies.split(",")]
    for r in rows:
        parts = ", ".join(f"{k} {r['full_batch_ms'][k]:.2f}" for k in PHASES)
        print(f"{r['policy']:<9} {r['requests']} requests: host {r['full_batch_ms']['total']:.2f} ms/step at a "
              f"full batch, {r['full_batch_ms']['critical']:.2f} on the critical path ({parts}); {r['steps']} steps, "
              f"{r['tokens_per_step']:.1f} tokens/step")
    _save(args, "host_time", rows)
    return 0


def _save(args: argparse.Namespace, bench: str, rows: list[dict], **extra) -> None:
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"bench": bench, "shape": args.shape, "acceptance": args.acceptance,
                                              "prompt_len": args.prompt_len, "output_len": args.output_len,
                                              **extra, "rows": rows}, indent=1))
        print(f"saved {args.out}")


def measure(policy: str, shape: str, requests: int, prompt_len: int, output_len: int, acceptance: str) -> dict:
    engine = _engine(policy, shape, requests, prompt_len, output_len, acceptance)
    timers = _time_phases(engine)
    add_random_requests(engine, requests, prompt_len, output_len)
    full: dict[str, list[float]] = defaultdict(list)
    steps = 0
    while engine.has_work():
        for k in timers:
            timers[k] = 0.0
        t0 = time.perf_counter()
        outs = engine.step()
        wall = time.perf_counter() - t0
        steps += 1
        if len(outs) == requests:  # every request decoding (and reporting) in this step
            full["total"].append(wall)
            full["critical"].append(wall - sum(timers[k] for k in overlapped_phases(engine)))
            for k, v in timers.items():
                full[k].append(v)
    return {"policy": policy, "requests": requests, "steps": steps,
            "tokens_per_step": requests * output_len / steps,
            "full_batch_steps": len(full["total"]),
            "full_batch_ms": {k: 1e3 * float(np.median(v)) if v else 0.0 for k, v in full.items()}}


def add_random_requests(engine: Engine, n: int, prompt_len: int, output_len: int, seed: int = 0,
                        first_id: int = 0) -> None:
    """``n`` requests of random prompt ids (seeded), each decoding ``output_len`` tokens."""
    rng, vocab = random.Random(seed), engine.tokenizer.vocab_size
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    for i in range(first_id, first_id + n):
        engine.add_request(str(i), [rng.randrange(100, vocab - 100) for _ in range(prompt_len)], params)


def _loads(args: argparse.Namespace) -> list[int]:
    return [int(n) for n in str(args.requests).split(",")]


def _run_emulated(args: argparse.Namespace) -> int:
    rows = []
    pipelines = (args.pipelines or f"off,{args.pipeline_min_running},auto").split(",")
    t0, knee, slope = (float(x) for x in args.emulated_curve.split(","))
    curve = LatencyProfile.synthetic(t0, knee, slope)
    for requests in _loads(args):
        for policy, pipeline in ((p, q) for p in args.policies.split(",") for q in pipelines):
            row = measure_overlap(policy, args.shape, requests, args.prompt_len, args.output_len,
                                  args.acceptance, pipeline, curve)
            rows.append(row)
            print(f"{row['policy']:<18} {row['requests']} requests: wall {row['wall_ms_per_step']:.1f} ms/step, "
                  f"device {row['device_ms_per_step']:.1f}, wall/device {row['wall_over_device']:.3f}, "
                  f"{row['output_tok_s']:.0f} tok/s ({row['steps']} steps)", flush=True)
    _save(args, "host_overlap", rows, device_profile=curve.to_json())
    return 0


def measure_overlap(policy: str, shape: str, requests: int, prompt_len: int, output_len: int, acceptance: str,
                    pipeline: str, curve: LatencyProfile = EMULATED_8B) -> dict:
    """Wall and emulated device time over the steps where every request decodes (from the
    step all of them decode until the first one finishes). ``pipeline``: off | N | auto."""
    engine = _engine(policy, shape, requests, prompt_len, output_len, acceptance, curve)
    engine.flights.pipeline = pipeline_rule(pipeline, curve.predict)
    device = EmulatedDevice(curve, engine.tokenizer.vocab_size).attach(engine)
    add_random_requests(engine, requests, prompt_len, output_len)
    start = None
    while engine.has_work():
        if start is None and sum(r.state is RequestState.DECODING for r in engine.scheduler.running) == requests:
            start = (time.perf_counter(), device.busy_s, engine.stats.tokens_committed, engine.stats.steps)
        outs = engine.step()
        if start is not None and any(o.finished for o in outs):
            break
    end = time.perf_counter()
    wall, busy = end - start[0], device.busy_s - start[1] - max(0.0, device.free_at - end)  # not the queued tail
    steps = engine.stats.steps - start[3]
    name = policy + {"off": "", "auto": "+auto"}.get(pipeline, "+pipeline")
    return {"policy": name, "requests": requests, "steps": steps, "wall_s": wall, "device_s": busy,
            "wall_ms_per_step": 1e3 * wall / steps, "device_ms_per_step": 1e3 * busy / steps,
            "wall_over_device": wall / busy, "output_tok_s": (engine.stats.tokens_committed - start[2]) / wall}


def _engine(policy: str, shape: str, requests: int, prompt_len: int, output_len: int, acceptance: str,
            profile: LatencyProfile = EMULATED_8B, token_budget: int | None = None) -> Engine:
    """``profile``: what elastic plans with (the emulated device's curve, or an 8B step's shape).
    ``token_budget``: a step's rows at most (None: room for every request's whole block, so
    the host work of full-batch steps is what is timed)."""
    page = 16
    pages = requests * (-(-(prompt_len + output_len + 64) // page)) + 64
    path = Path(regimes.resolve(acceptance))
    profile_path = Path.home() / ".cache" / "optimus" / "host_bench_profile.json"
    profile.save(profile_path)
    config = engine_config(model=f"random-tiny:{shape}", device="cpu", dtype="float32", policy=policy,
                           num_pages=pages, max_running=requests, max_waiting=requests,
                           max_tokens_per_step=token_budget or max(8192, requests * 64), prefill_chunk=prompt_len,
                           replay_acceptance=str(path), profile_path=str(profile_path))
    engine = Engine(config)
    engine.post.stream_text = engine.post.final_text = False  # as the engine process: front-ends detokenize
    EmulatedDevice(None, engine.tokenizer.vocab_size).attach(engine)  # no device
    return engine


def timed(inner, totals: dict[str, float], phase: str):
    """``inner`` adding its wall time to ``totals[phase]`` on every call."""

    def timed_call(*a, **kw):
        t0 = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            totals[phase] += time.perf_counter() - t0
    return timed_call


def _time_phases(engine: Engine) -> dict[str, float]:
    """Wrap the step's host phases with accumulating timers (reset per step by the caller)."""
    timers = dict.fromkeys(PHASES, 0.0)

    def wrap(obj, name: str, phase: str) -> None:
        setattr(obj, name, timed(getattr(obj, name), timers, phase))

    wrap(engine.scheduler, "schedule", "schedule")
    wrap(engine.runner, "build", "build")
    wrap(engine.post, "commit_step", "commit")
    wrap(engine.post.settler, "settle_all", "settle")  # finish checks: which requests end before the next plan
    wrap(engine, "_report", "outputs")  # the requests' outputs, after the next launch
    wrap(engine.scheduler, "complete_step", "cursors")  # cache cursors, the policy's feedback queued
    wrap(engine.scheduler, "learn_and_plan_ahead", "learning")  # the policy learns from it, plans the next step
    return timers
