"""``optimus bench latency-fit``: a model's step latency over batch x chunk on this device, and
how well each latency model the elastic policy could plan with predicts steps it did not see.

Random weights at a named shape (``--shape llada2-mini``; ``--set KEY=VALUE`` overrides config
fields, e.g. fewer layers on a CPU). Every grid step is timed as ``optimus profile`` times it;
then each step is left out in turn and predicted from the others:

- ``tokens``: the profile's interpolation straight in tokens, the hinge above the range (what a
  dense model plans with);
- ``experts``: the same points, the curves shaped by the experts-touched model (MoE models);
- ``expert model`` / ``hinge``: either fit alone.

Interior steps (between two measured chunks of the same batch) and the largest chunk of each
batch (extrapolation) are reported apart. Output: ``latency_fit.json`` and ``latency_fit.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from optimus.policy.elastic.experts import ExpertCostModel, ExpertRouting
from optimus.policy.elastic.latency import LatencyPoint, LatencyProfile

METHODS = ("tokens", "experts", "expert model", "hinge")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="llada2-mini", help="model shape (random weights)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of the shape (an int), e.g. num_hidden_layers=2; repeatable")
    p.add_argument("--tiny", action="store_true", help="the shape shrunk as random-tiny: models are (smoke runs)")
    p.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    p.add_argument("--chunks", default="1,2,4,8,16,32")
    p.add_argument("--max-tokens", type=int, default=8192, help="skip grid steps with more tokens")
    p.add_argument("--context", type=int, default=256, help="cached positions per request in each step")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="latency_fit", help="output directory")


def run(args: argparse.Namespace) -> int:
    from optimus.policy.elastic.profiler import profile_latency
    from optimus.policy.elastic.setup import device_name
    from optimus.executor.timed_step import make_step_fn

    engine, label, overrides = _engine(args)
    batches, chunks = _ints(args.batches), _ints(args.chunks)
    # Random-token rows: the routing model predicts the experts independent tokens touch.
    step = make_step_fn(engine, context=args.context, random_rows=True)
    profile = profile_latency(step, batches, chunks, warmup=2, repeats=args.repeats, max_tokens=args.max_tokens)
    profile = dataclasses.replace(profile, device=device_name(engine.device), model_id=label, context=args.context,
                                  routing=ExpertRouting.of(engine.spec))
    report = evaluate(profile)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency_fit.json").write_text(json.dumps({"bench": "latency_fit", "shape": label, "overrides": overrides,
                                                              **report}, indent=1))
    plot(profile, out / "latency_fit.png")
    print(_table(report))
    print(f"saved {out / 'latency_fit.json'} and {out / 'latency_fit.png'}")
    return 0


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _engine(args: argparse.Namespace):
    from optimus.bench.shapes import random_model
    from optimus.config import engine_config
    from optimus.engine.engine import Engine
    from optimus.models.loader import resolve_device, resolve_dtype

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        overrides[key.strip()] = int(value)
    device = resolve_device(args.device)
    loaded = random_model(args.shape, device=device, dtype=resolve_dtype(args.dtype, device), tiny=args.tiny,
                          **overrides)
    pages = -(-args.context // 16) + 1  # the profiling batch shares one request's pages read-only
    config = engine_config(model=f"random:{args.shape}", device=str(device), dtype=args.dtype, policy="fixed:1",
                           num_pages=pages, page_size=16)
    label = args.shape + (" (tiny)" if args.tiny else " (scaled)" if overrides else "")
    return Engine(config, loaded=loaded), label, overrides


def evaluate(profile: LatencyProfile) -> dict:
    """Every point left out in turn and predicted from the rest by each method: relative
    errors (predicted / measured - 1), split into interior and largest-chunk (beyond) steps."""
    rows = []
    for i, p in enumerate(profile.points):
        same = sorted(q.tokens for q in profile.points if q.batch == p.batch)
        if len(same) < 3 or p.tokens == same[0]:
            continue  # the smallest chunk of a batch: below the curve's range, nothing to learn
        rest = profile.points[:i] + profile.points[i + 1:]
        where = "beyond" if p.tokens == same[-1] else "interior"
        row = {"batch": p.batch, "chunk": p.tokens // p.batch, "where": where, "ms": 1e3 * p.seconds}
        for name, predict in _predictors(rest, profile.routing).items():
            row[name] = float(predict(p.tokens, p.batch) / p.seconds - 1.0)
        rows.append(row)
    summary = {}
    for where in ("interior", "beyond"):
        sel = [r for r in rows if r["where"] == where]
        summary[where] = {m: {"median_abs": float(np.median([abs(r[m]) for r in sel])),
                              "max_abs": float(max(abs(r[m]) for r in sel))} for m in METHODS if sel and m in sel[0]}
    fits = {"hinge": dataclasses.asdict(profile.fit)}
    if profile.routing is not None:
        model = profile.cost_model
        fits["expert model"] = {k: getattr(model, k) for k in ExpertCostModel.FEATURES}
        fits["routing"] = profile.routing.to_json()
    return {"context": profile.context, "device": profile.device, "fits": fits,
            "points": [dataclasses.asdict(p) for p in profile.points], "held_out": rows, "summary": summary}


def _predictors(points: tuple[LatencyPoint, ...], routing: ExpertRouting | None) -> dict:
    tokens = LatencyProfile(points)
    out = {"tokens": tokens.predict, "hinge": lambda n, b: float(tokens.fit(n))}
    if routing is not None:
        experts = LatencyProfile(points, routing=routing)
        out["experts"] = experts.predict
        out["expert model"] = lambda n, b: float(experts.cost_model(n, b))
    return out


def _table(report: dict) -> str:
    lines = ["held-out step latency, |predicted / measured - 1|: median (max)"]
    for where, methods in report["summary"].items():
        cells = ", ".join(f"{m} {100 * v['median_abs']:.1f}% ({100 * v['max_abs']:.1f}%)" for m, v in methods.items())
        lines.append(f"  {where:<8} {cells}")
    return "\n".join(lines)


def plot(profile: LatencyProfile, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if profile.routing else 1, figsize=(12 if profile.routing else 6.5, 4.5),
                             squeeze=False)
    ax = axes[0][0]
    for b in sorted({p.batch for p in profile.points}):
        pts = sorted((p.tokens, p.seconds) for p in profile.points if p.batch == b)
        n = np.geomspace(pts[0][0], pts[-1][0], 64)
        line, = ax.plot(n, 1e3 * profile.predict_many(n, b), lw=1)
        ax.plot([t for t, _ in pts], [1e3 * s for _, s in pts], "o", ms=3, color=line.get_color(), label=f"batch {b}")
    ax.set(xscale="log", yscale="log", xlabel="tokens in the step", ylabel="step time (ms)",
           title=f"{profile.model_id} on {profile.device}")
    ax.legend(fontsize=7)
    if profile.routing:
        n = np.geomspace(1, max(p.tokens for p in profile.points), 128)
        axes[0][1].plot(n, profile.routing.touched(n))
        axes[0][1].set(xscale="log", xlabel="routed tokens in the step", ylabel="expected experts touched per layer",
                       title=f"top-{profile.routing.top_k} of {profile.routing.experts} experts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
