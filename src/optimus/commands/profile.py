"""``optimus profile``: measure this device's step-latency curve for a model, fit its knee and
save the profile where the engine looks for it (keyed by device and model). A saved profile
that already covers the asked grid is re-checked instead, and kept while it still matches
the device; ``--force`` measures regardless."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from optimus.policy.elastic.profiler import (
    DEFAULT_BATCHES, DEFAULT_CHUNKS, QUICK_BATCHES, QUICK_CHUNKS, RECHECK_TOLERANCE,
)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="HF model directory, or 'default' for the shipped model (the default)")
    parser.add_argument("--dtype", default="auto",
                        help="auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float16 | float32 (default: auto)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--batches", type=_ints, default=None,
                        help=f"requests per step to measure (default: {','.join(map(str, DEFAULT_BATCHES))})")
    parser.add_argument("--chunks", type=_ints, default=None,
                        help=f"chunk sizes to measure (default: {','.join(map(str, DEFAULT_CHUNKS))})")
    parser.add_argument("--quick", action="store_true",
                        help=f"a small grid ({len(QUICK_BATCHES)} x {len(QUICK_CHUNKS)} points) for a first look")
    parser.add_argument("--context", type=int, default=512,
                        help="cached positions per request in each step (default: 512)")
    parser.add_argument("--max-tokens", type=int, default=8192,
                        help="skip grid steps with more tokens than this (default: 8192)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per grid point (default: 2)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs per grid point, the median is kept (default: 5)")
    parser.add_argument("--out", default=None, help="output JSON (default: the engine's per-device, per-model path)")
    parser.add_argument("--force", action="store_true",
                        help="measure even when a saved profile covers this grid and still matches the device "
                             f"(within {100 * RECHECK_TOLERANCE:.0f}%%)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _engine(args: argparse.Namespace, page_size: int = 16):
    """An engine with a fixed policy (no profile needed) and a cache sized as a server's: each
    profiled request attends to a context of its own where the pages allow (timed_step: on a
    mixture-of-experts model, requests over one shared context route alike)."""
    from optimus.config import engine_config
    from optimus.engine.engine import Engine

    return Engine(engine_config(model=args.model, dtype=args.dtype, device=args.device, policy="fixed:1",
                                page_size=page_size))


def run(args: argparse.Namespace) -> int:
    from optimus.policy.elastic.setup import device_name, eager_cells, model_id, with_routing
    from optimus.policy.elastic.latency import default_profile_path
    from optimus.policy.elastic.profiler import grid_cells, profile_latency
    from optimus.executor.timed_step import make_step_fn

    if args.context < 1 or args.max_tokens < 1 or args.warmup < 0 or args.repeats < 1:
        raise ValueError("--context, --max-tokens and --repeats must be >= 1, --warmup >= 0")
    batches = args.batches or (QUICK_BATCHES if args.quick else DEFAULT_BATCHES)
    chunks = args.chunks or (QUICK_CHUNKS if args.quick else DEFAULT_CHUNKS)
    cells = grid_cells(batches, chunks, args.max_tokens)
    engine = _engine(args)
    dev, mid = device_name(engine.device), model_id(engine)
    path = Path(args.out) if args.out else default_profile_path(dev, mid)
    if not args.force:
        cached = _kept_profile(engine, path, cells, args.context, dev)
        if cached is not None:
            _report(cached, path, "kept")
            return 0
    step = make_step_fn(engine, context=args.context, repeats=1)
    profile = profile_latency(step, batches, chunks, warmup=args.warmup, repeats=args.repeats,
                              progress=not args.no_progress, max_tokens=args.max_tokens,
                              extra_cells=eager_cells(engine, list(batches), args.max_tokens))
    profile = with_routing(dataclasses.replace(profile, device=dev, model_id=mid, context=args.context,
                                               source="optimus profile"), engine.spec)
    _report(profile, profile.save(path), "saved")
    return 0


def _kept_profile(engine, path: Path, cells: list[tuple[int, int]], context: int, dev: str):
    """The saved profile at ``path`` when it measured every asked step at this context on this
    device and a re-check finds it still true; None (with the reason printed) otherwise."""
    from optimus.policy.elastic.latency import LatencyProfile
    from optimus.policy.elastic.profiler import recheck_profile
    from optimus.executor.timed_step import make_step_fn

    if not path.exists():
        return None
    try:
        cached = LatencyProfile.load(path)
    except (ValueError, KeyError, TypeError) as exc:
        print(f"{path} is unreadable ({exc}): measuring")
        return None
    if cached.device != dev or cached.context != context or not set(cells) <= set(cached.cells()):
        print(f"{path} ({cached.describe()}) does not cover this grid at context {context} on {dev}: measuring")
        return None
    check = recheck_profile(cached, make_step_fn(engine, context=context))
    if not check.holds():
        print(f"{path} ({cached.describe()}) no longer matches this device: {check.describe()}; measuring")
        return None
    print(f"{path} ({cached.describe()}) still matches this device: {check.describe()}; "
          "--force measures anyway")
    return cached


def _report(profile, path: Path, verb: str) -> None:
    fit = profile.fit
    print(f"device {profile.device}, model {profile.model_id}: {len(profile.points)} points")
    print(f"flat {fit.t0 * 1e3:.2f} ms up to the knee N* = {profile.knee:.0f} tokens, "
          f"then {fit.b * 1e6:.2f} us per token")
    if profile.cost_model is not None:
        print(f"experts touched: {profile.describe_experts()} (the elastic policy's curves follow it; "
              "'optimus bench latency-fit' reports its error on held-out steps)")
    for p in profile.points:
        print(f"  {p.batch:>4} x {p.tokens // p.batch:<3} = {p.tokens:>6} tokens  {p.seconds * 1e3:9.3f} ms")
    print(f"{verb} {path}")
