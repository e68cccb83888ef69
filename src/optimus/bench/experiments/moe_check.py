"""GPU check of the fused MoE kernel and the MoE shapes (CUDA only; minutes, mostly schedule4).

(a) accuracy: the Triton kernel and the torch reference, both bf16, each against the fp32
    reference on the same inputs, at llada2-mini (256 experts, top-8, H 2048, I 512) and
    sdar-30b-a3b (128 experts, top-8, H 2048, I 768) shapes, T in {1, 4, 32, 256}; and the
    kernel replayed from a CUDA graph after new routing was copied into its inputs (no host
    sync: the graph must follow the new ids).
(b) decode timing of the expert computation (routing given), T in {1, 2, 4, 8, 16, 32} rows:
    Triton in a CUDA graph (the dispatching default, the grouped path, and the pair path at a
    few tile sizes) vs the torch reference (eager: it reads counts on the host), against the
    bytes of the touched experts' weights (what the step must read from HBM) as achieved TB/s.
(c) local (``--parts local``): the same three paths and the touched-experts path (its accuracy,
    graph replay and a few tile sizes) on mask-row routing, where the rows of one request's
    window share most of their experts (``local_ids``).
(d) schedule4 (4 tokens/step, prompt 256, output 256, block 32) at batch 1, 8, 32 on
    random-weight llada2-mini and llada-8b (bench offline's run_schedule4).

  PYTHONPATH=src python -m optimus.bench.experiments.moe_check --out DIR
  (or in parts: --parts kernel; --parts schedule4 --schedule4-shapes llada2-mini; ... llada-8b)
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import time
from pathlib import Path

import torch

from optimus.bench.experiments.gpu_timing import time_graph_ms
from optimus.kernels import _fused_moe_triton as moe_paths
from optimus.kernels._fused_moe_triton import MoeTiles, PairTiles, fused_moe_grouped, fused_moe_pairs, fused_moe_triton
from optimus.kernels._moe_touched_triton import PAIRS_LIMIT, TouchedTiles, fused_moe_touched
from optimus.kernels.reference import fused_moe_reference

# (experts, top_k, hidden, expert inner size)
MOE_SHAPES = {"llada2-mini": (256, 8, 2048, 512), "sdar-30b-a3b": (128, 8, 2048, 768)}


DEV = "cuda"
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12}  # the cards' published peaks (SXM)


def hbm_bytes_per_s() -> float:
    name = torch.cuda.get_device_name()
    return next((v for card, v in HBM_BYTES_PER_S.items() if card in name), float("nan"))


def make_inputs(shape: str, t: int, seed: int = 0, weights_too: bool = True):
    """(x, w13, w2, combine weights, ids); ``weights_too=False``: no expert weights (None)."""
    e, k, h, inner = MOE_SHAPES[shape]
    dev = DEV
    gen = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(t, h, device=dev, generator=gen)
    w13 = w2 = None
    if weights_too:
        w13 = torch.randn(e, 2 * inner, h, device=dev, generator=gen) * h ** -0.5
        w2 = torch.randn(e, h, inner, device=dev, generator=gen) * inner ** -0.5
    ids = torch.rand(t, e, device=dev, generator=gen).argsort(-1)[:, :k]  # k distinct experts per token
    weights = torch.rand(t, k, device=dev, generator=gen)
    return x, w13, w2, weights / weights.sum(-1, keepdim=True), ids


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (relative to the output's scale)."""
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12))


def check_accuracy(tol: float = 2e-2, paths: tuple = (("grouped", fused_moe_grouped), ("pairs", fused_moe_pairs)),
                   max_pairs: int | None = None) -> list[dict]:
    rows = []
    for shape in MOE_SHAPES:
        for t in (1, 4, 32, 256):
            x, w13, w2, weights, ids = make_inputs(shape, t, seed=t)
            if max_pairs is not None and ids.numel() > max_pairs:
                continue
            exact = fused_moe_reference(x, w13, w2, weights, ids)
            bf = [a.bfloat16() for a in (x, w13, w2)]
            torch_err = _err(fused_moe_reference(*bf, weights, ids), exact)
            for path, fn in paths:
                triton_err = _err(fn(*bf, weights, ids), exact)
                rows.append({"shape": shape, "T": t, "path": path, "triton_bf16_rel_err": triton_err,
                             "torch_bf16_rel_err": torch_err, "ok": triton_err <= max(tol, 2 * torch_err)})
    return rows


def check_graph_replay(shape: str = "llada2-mini", t: int = 8, fn=fused_moe_triton) -> dict:
    """The kernel ``fn`` replayed from a CUDA graph after new routing was copied into its inputs."""
    x, w13, w2, weights, ids = make_inputs(shape, t, seed=1)
    x, w13, w2 = x.bfloat16(), w13.bfloat16(), w2.bfloat16()
    out = {}
    graph = torch.cuda.CUDAGraph()
    fn(x, w13, w2, weights, ids)  # compile outside the capture
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out["y"] = fn(x, w13, w2, weights, ids)
    _, _, _, weights2, ids2 = make_inputs(shape, t, seed=2)
    ids.copy_(ids2)
    weights.copy_(weights2)
    graph.replay()
    torch.cuda.synchronize()
    err = _err(out["y"], fused_moe_reference(x, w13, w2, weights, ids))
    return {"shape": shape, "T": t, "path": fn.__name__, "rel_err_after_new_routing": err, "ok": err < 2e-2}


def _time_eager_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


# Pair-path tiles timed beside the default (gate/up columns, down columns, K per iteration, warps).
PAIR_VARIANTS = (PairTiles(), PairTiles(32, 32, 128), PairTiles(16, 16, 256), PairTiles(8, 16, 256),
                 PairTiles(16, 32, 128, 8))


def rotating(fn, cases: list):
    """A call of ``fn`` on the next case each time: time_graph_ms captures 20 calls, each on its
    own routing, so no call finds the last one's expert weights in L2 (50 MB on an H200)."""
    turn = itertools.cycle(cases)
    return lambda: fn(*next(turn))

# Touched-path tiles (gate/up columns, down columns, K per iteration, warps, stages): the default first.
TOUCHED_VARIANTS = (TouchedTiles(), TouchedTiles(gate_up_n=16, down_n=32), TouchedTiles(gate_up_n=64),
                    TouchedTiles(block_k=256, num_stages=2), TouchedTiles(gate_up_n=16, down_n=64, block_k=256),
                    TouchedTiles(num_warps=8, gate_up_n=64, down_n=128))

# Grouped-path tiles timed beside the default at 8 rows and more (block_m, n, k, warps, stages).
GROUPED_VARIANTS = (MoeTiles(16, 64, 128, 4, 4), MoeTiles(16, 128, 64, 4, 4), MoeTiles(16, 32, 128, 4, 4),
                    MoeTiles(16, 64, 128, 8, 3), MoeTiles(16, 128, 128, 8, 3))


def time_decode(draws: int = 20) -> list[dict]:
    rows = []
    for shape, (e, k, h, inner) in MOE_SHAPES.items():
        _, w13, w2, _, _ = make_inputs(shape, 1)
        w13, w2 = w13.bfloat16(), w2.bfloat16()
        for t in (1, 2, 4, 8, 16, 32):
            cases = []
            for seed in range(draws):
                x, _, _, weights, ids = make_inputs(shape, t, seed=100 * t + seed, weights_too=False)
                cases.append((x.bfloat16(), w13, w2, weights, ids))
            touched = sum(int(c[4].unique().numel()) for c in cases) / draws
            weight_bytes = touched * 3 * h * inner * 2
            triton_ms = time_graph_ms(rotating(fused_moe_triton, cases))
            grouped_ms = time_graph_ms(rotating(fused_moe_grouped, cases))
            touched_ms = time_graph_ms(rotating(fused_moe_touched, cases))
            pairs_ms = {f"{v.gate_up_n}/{v.down_n}/{v.block_k}/w{v.num_warps}":
                        time_graph_ms(rotating(lambda *c, v=v: fused_moe_pairs(*c, v), cases)) for v in PAIR_VARIANTS}
            grouped_ms_by_tiles = {} if t < 8 else {
                f"{v.block_m}/{v.block_n}/{v.block_k}/w{v.num_warps}/s{v.num_stages}":
                time_graph_ms(rotating(lambda *c, v=v: fused_moe_grouped(*c, v), cases)) for v in GROUPED_VARIANTS}
            torch_ms = _time_eager_ms(lambda: fused_moe_reference(*cases[0]))
            rows.append({"shape": shape, "T": t, "touched_experts": touched, "weight_MB": weight_bytes / 1e6,
                         "default_path": "pairs" if t * k <= moe_paths.PAIRS_MAX else
                         "touched" if t * k <= moe_paths.TOUCHED_MAX else "grouped",
                         "triton_ms": triton_ms, "triton_TBps": weight_bytes / triton_ms / 1e9,
                         "grouped_ms": grouped_ms, "touched_ms": touched_ms,
                         "grouped_ms_by_tiles": grouped_ms_by_tiles, "pairs_ms": pairs_ms,
                         "torch_ms": torch_ms, "torch_TBps": weight_bytes / torch_ms / 1e9})
            r = rows[-1]
            best = min(pairs_ms, key=pairs_ms.get)
            print(f"  {shape} T={t:3d}: {touched:5.1f} experts, {r['weight_MB']:.1f} MB; triton {triton_ms:.3f} ms "
                  f"({r['triton_TBps']:.2f} TB/s, {r['default_path']}); grouped {grouped_ms:.3f}, "
                  f"touched {touched_ms:.3f}, pairs best "
                  f"{best} {pairs_ms[best]:.3f} ms; grouped tiles {grouped_ms_by_tiles}; torch {torch_ms:.3f} ms",
                  flush=True)
    return rows


def local_ids(requests: int, rows: int, e: int, k: int, seed: int, swap: float = 0.1) -> torch.Tensor:
    """[requests * rows, k] routing as a dLLM's mask rows route it: the rows of one request's
    window share one set of k experts, each row swapping each of them for another with
    probability ``swap``. (A tiny LLaDA2 with 256 experts, top-8, put 4 requests x 4 mask rows on
    43 experts of 128 pairs, one request's 16 rows on 15: docs/models.md, "Mask rows route alike".)"""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    base = torch.rand(requests, e, device=DEV, generator=gen).argsort(-1)[:, :k].repeat_interleave(rows, 0)
    other = torch.rand(requests * rows, e, device=DEV, generator=gen).argsort(-1)[:, :k]
    swapped = torch.rand(requests * rows, k, device=DEV, generator=gen) < swap
    ids = torch.where(swapped, other, base)
    # keep k distinct experts per row: a swapped-in duplicate falls back to the base expert
    dup = (ids[:, :, None] == ids[:, None, :]).triu(1).any(1)
    return torch.where(dup, base, ids)


def time_decode_local(shape: str = "llada2-mini", draws: int = 20) -> list[dict]:
    """The default path, the pair (GEMV) path and the grouped path on mask-row routing
    (``local_ids``): pairs re-read an expert that other pairs chose, grouped reads it once."""
    e, k, h, inner = MOE_SHAPES[shape]
    _, w13, w2, _, _ = make_inputs(shape, 1)
    w13, w2 = w13.bfloat16(), w2.bfloat16()
    rows_out = []
    for requests, rows in ((1, 4), (1, 8), (1, 16), (1, 32), (4, 1), (4, 2), (4, 4), (4, 8), (16, 1), (16, 2),
                           (8, 8), (64, 1)):
        t, cases = requests * rows, []
        for seed in range(draws):
            x, _, _, weights, _ = make_inputs(shape, t, seed=7 * t + seed, weights_too=False)
            cases.append((x.bfloat16(), w13, w2, weights, local_ids(requests, rows, e, k, seed)))
        touched = sum(int(c[4].unique().numel()) for c in cases) / draws
        weight_bytes = touched * 3 * h * inner * 2
        ms = {"default": time_graph_ms(rotating(fused_moe_triton, cases)),
              "pairs": time_graph_ms(rotating(fused_moe_pairs, cases)),
              "grouped": time_graph_ms(rotating(fused_moe_grouped, cases))}
        for v in TOUCHED_VARIANTS:
            name = f"touched {v.gate_up_n}/{v.down_n}/{v.block_k}/w{v.num_warps}/s{v.num_stages}"
            ms[name] = time_graph_ms(rotating(lambda *c, v=v: fused_moe_touched(*c, v), cases))
        rows_out.append({"shape": shape, "requests": requests, "rows_per_request": rows, "T": t,
                         "touched_experts": touched, "weight_MB": weight_bytes / 1e6, "ms": ms,
                         "TBps": {name: weight_bytes / v / 1e9 for name, v in ms.items()}})
        print(f"  {shape} local routing {requests} x {rows} rows: {touched:.1f} experts of {t * k} pairs, "
              f"{weight_bytes / 1e6:.0f} MB; " + ", ".join(f"{n} {v:.3f} ms" for n, v in ms.items()), flush=True)
    return rows_out


def time_layer(shape: str = "llada2-mini", draws: int = 20) -> list[dict]:
    """The routed MoE layer (router + experts, no shared expert) in a CUDA graph, routing in the
    Triton kernel against torch's ``route``, by the weights the layer must read: the touched
    experts' and the router's."""
    from optimus.models.moe import SparseMoE
    from optimus.models.spec import MoEConfig

    e, k, h, inner = MOE_SHAPES[shape]
    cfg = MoEConfig(num_experts=e, top_k=k, expert_size=inner, layers=(1,), scoring="sigmoid", n_group=8,
                    topk_group=4, scaling=2.5, expert_bias=True)  # LLaDA2.0's routing
    layer = SparseMoE(h, cfg).to(DEV, torch.bfloat16)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=h ** -0.5)

    def torch_routed(x):
        weights, ids = layer.gate(x, "torch")
        return fused_moe_triton(x, layer.experts.w13, layer.experts.w2, weights, ids)

    rows = []
    for t in (1, 2, 4, 8):
        xs = [(torch.randn(t, h, device=DEV, dtype=torch.bfloat16),) for _ in range(draws)]
        touched = sum(int(layer.gate(x, "torch")[1].unique().numel()) for (x,) in xs) / draws
        weight_bytes = touched * 3 * h * inner * 2 + e * h * 2
        floor_ms = weight_bytes / hbm_bytes_per_s() * 1e3
        kernel_ms = time_graph_ms(rotating(layer, xs))
        torch_route_ms = time_graph_ms(rotating(torch_routed, xs))
        rows.append({"shape": shape, "T": t, "touched_experts": touched, "weight_MB": weight_bytes / 1e6,
                     "floor_ms": floor_ms, "layer_ms": kernel_ms, "layer_over_floor": kernel_ms / floor_ms,
                     "layer_TBps": weight_bytes / kernel_ms / 1e9, "layer_torch_route_ms": torch_route_ms})
        print(f"  {shape} layer T={t}: {touched:.1f} experts, {weight_bytes / 1e6:.1f} MB, floor {floor_ms:.4f} ms; "
              f"{kernel_ms:.4f} ms ({kernel_ms / floor_ms:.2f}x floor, {weight_bytes / kernel_ms / 1e9:.2f} TB/s); "
              f"with torch routing {torch_route_ms:.4f} ms", flush=True)
    return rows


def step_weight_bytes(shape: str, rows: int) -> float:
    """Weight bytes (bf16) a step of ``rows`` rows must read at an MoE shape: every layer's
    attention, the dense layers' MLPs, each sparse layer's router, shared expert and the experts
    ``rows`` tokens touch on average (E (1 - (1 - k/E)^rows)), and the LM head (embedding lookups
    and norms are negligible)."""
    from optimus.models.shapes import SHAPES

    c = SHAPES[shape]
    h, layers, e, k = c["hidden_size"], c["num_hidden_layers"], c["num_experts"], c["num_experts_per_tok"]
    inner, hd = c["moe_intermediate_size"], c["head_dim"]
    dense = c.get("first_k_dense_replace", 0)
    attention = 2 * h * c["num_attention_heads"] * hd + 2 * h * c["num_key_value_heads"] * hd
    touched = e * (1 - (1 - k / e) ** rows)
    sparse = (touched + c.get("num_shared_experts", 0)) * 3 * h * inner + e * h
    params = layers * attention + dense * 3 * h * c["intermediate_size"] + (layers - dense) * sparse + c["vocab_size"] * h
    return 2.0 * params


def run_schedule4_shapes(shapes: list[str], batches: list[int], graph_max_tokens: int | None = None,
                         dispatch: str | None = None) -> list[dict]:
    """schedule4 rows; at MoE shapes each row also gets its decode step's weight-read floor (a
    step computes its requests' 32-position block windows: 32 rows a request). A batch-32 step
    (1,024 rows) is past the default graph limit (512 tokens) and runs eagerly: on llada2-mini
    that is ~1,300 launches a step, host-bound; ``graph_max_tokens`` serves it from a graph."""
    from optimus.bench.offline import run_schedule4
    from optimus.bench.timed_runs import Target

    target = Target(device="cuda", graph_max_tokens=graph_max_tokens)
    with moe_dispatch(dispatch):
        rows = [r for shape in shapes for r in run_schedule4(target, shape, batches)]
    for r in rows:
        r["graph_max_tokens"] = graph_max_tokens or "default"
        r["moe_dispatch"] = dispatch or f"{moe_paths.PAIRS_MAX}:{moe_paths.TOUCHED_MAX}"
        if r["shape"] in MOE_SHAPES:
            add_step_floor(r, hbm_bytes_per_s())
    return rows


@contextlib.contextmanager
def moe_dispatch(limits: str | None):
    """``PAIRS:TOUCHED``: fused_moe_triton's pair and touched-expert path limits for the block
    (an A/B of the dispatch in one process: the engines built inside read them at every call)."""
    saved = moe_paths.PAIRS_MAX, moe_paths.TOUCHED_MAX
    if limits:
        moe_paths.PAIRS_MAX, moe_paths.TOUCHED_MAX = (int(v) for v in limits.split(":"))
    try:
        yield
    finally:
        moe_paths.PAIRS_MAX, moe_paths.TOUCHED_MAX = saved


def add_step_floor(row: dict, bytes_per_s: float) -> None:
    weight_bytes = step_weight_bytes(row["shape"], 32 * row["batch"])
    row["step_floor_ms"] = weight_bytes / bytes_per_s * 1e3
    row["step_over_floor"] = row["mean_step_ms"] / row["step_floor_ms"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for moe_check.json")
    parser.add_argument("--parts", default="kernel,schedule4",
                        help="comma list of kernel (accuracy + decode timing), local (decode timing on mask-row "
                             "routing) and schedule4; each part "
                             "merges its sections into DIR/moe_check.json, so parts can run as separate commands")
    parser.add_argument("--schedule4-shapes", default="llada2-mini,llada-8b")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--graph-max-tokens", type=int, default=None,
                        help="schedule4 engines serve steps up to this many tokens from CUDA graphs (default: the "
                             "engine's); rows from another limit are kept beside these")
    parser.add_argument("--dispatch", default=None,
                        help="comma list of PAIRS:TOUCHED limits to run schedule4 under (an A/B of the MoE paths "
                             "fused_moe_triton picks; 128:0 was the dispatch before the touched path)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("moe_check needs CUDA")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "moe_check.json"
    t0, result = time.time(), (json.loads(path.read_text()) if path.exists() else {})
    parts = args.parts.split(",")
    result["meta"] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "triton": __import__("triton").__version__}

    def save() -> None:
        result["meta"]["wall_s"] = round(time.time() - t0, 1)
        path.write_text(json.dumps(result, indent=1))

    ok = True
    if "kernel" in parts:
        with torch.inference_mode():
            result["accuracy"] = check_accuracy()
            result["graph_replay"] = check_graph_replay()
        ok = all(r["ok"] for r in result["accuracy"]) and result["graph_replay"]["ok"]
        result["kernel_ok"] = ok
        print(f"accuracy {'PASS' if ok else 'FAIL'}:")
        for r in result["accuracy"] + [result["graph_replay"]]:
            print(f"  {json.dumps(r)}")
        save()
        print("batch-1 decode timing (expert computation, routing given):")
        with torch.inference_mode():
            result["decode_timing"] = time_decode()
        save()
        print("the routed layer (router + experts) against its weight-read floor:")
        with torch.inference_mode():
            result["layer_timing"] = time_layer()
        save()
    if "local" in parts:
        with torch.inference_mode():
            touched = (("touched", fused_moe_touched),)
            result["accuracy_touched"] = check_accuracy(paths=touched, max_pairs=PAIRS_LIMIT)
            result["accuracy_touched"].append(check_graph_replay(t=16, fn=fused_moe_touched))
        touched_ok = all(r["ok"] for r in result["accuracy_touched"])
        ok = ok and touched_ok
        print(f"touched path accuracy {'PASS' if touched_ok else 'FAIL'}:")
        for r in result["accuracy_touched"]:
            print(f"  {json.dumps(r)}")
        print("decode timing on mask-row routing (each request's rows share their experts):")
        with torch.inference_mode():
            result["decode_timing_local"] = time_decode_local()
        save()
    if "schedule4" in parts:
        print("schedule4:")
        shapes = args.schedule4_shapes.split(",")
        batches = [int(b) for b in args.batches.split(",")]
        rows = [r for dispatch in (args.dispatch or "").split(",")
                for r in run_schedule4_shapes(shapes, batches, args.graph_max_tokens, dispatch or None)]
        limit = args.graph_max_tokens or "default"
        result["schedule4"] = [r for r in result.get("schedule4", [])
                               if r["shape"] not in shapes or r.get("graph_max_tokens", "default") != limit] + rows
        save()
    print(f"wrote {path} ({result['meta']['wall_s']} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
