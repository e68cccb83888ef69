"""Where a sparse MoE layer's time goes at decode sizes (CUDA only; about a minute).

The LLaDA2.0-mini sparse layer (router, 256 routed experts at top-8, shared expert) with random
bf16 weights, each part timed in CUDA graphs on rotating inputs (no call finds the last one's
experts in L2), against the bytes it must read:

- ``router_casts``: the gate as the reference runs it, ``linear(x.float(), weight.float())``,
  then the routing kernel; ``router_kernel``: the split fp32 logits kernel, then the routing
  kernel summing its parts (the engine's path); the logits kernel alone at a few tilings, and
  the routing kernel alone at 1, 2 and 4 warps;
- ``experts``: fused_moe on the layer's own routing (the touched-experts path at these sizes);
- ``shared``: the shared expert (merged gate/up linear, SiLU-mul, down linear) and its add;
- ``shared_folded``: the routed experts with the shared expert as a (k+1)-th pair of weight 1
  (its weights stacked as expert E): what folding it into the fused kernel would cost;
- ``layer``: the module's forward as the engine calls it.

Then the layer's kernels one by one at one row (torch.profiler over eager calls: their device
time, not the graph's launch gaps).

  PYTHONPATH=src python -m optimus.bench.experiments.moe_layer_parts --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from optimus.bench.experiments.gpu_timing import time_graph_ms
from optimus.bench.experiments.moe_check import DEV, MOE_SHAPES, hbm_bytes_per_s, rotating
from optimus.kernels._moe_route_triton import moe_route_triton, router_logits_triton
from optimus.kernels.fused_moe import fused_moe
from optimus.kernels.moe_route import moe_route
from optimus.models.layers import FusedOps, GatedMLP
from optimus.models.moe import SparseMoE
from optimus.models.spec import MoEConfig

# The logits kernel's (block_e, block_k, programs): the default first; programs=1 never splits the inputs.
LOGIT_TILES = ((16, 128, 128), (16, 256, 128), (16, 128, 256), (32, 128, 128), (16, 128, 64), (16, 256, 1))


def build_layer(shape: str) -> SparseMoE:
    e, k, h, inner = MOE_SHAPES[shape]
    cfg = MoEConfig(num_experts=e, top_k=k, expert_size=inner, layers=(1,), scoring="sigmoid", n_group=8,
                    topk_group=4, scaling=2.5, expert_bias=True, shared_size=inner)  # LLaDA2.0's routing
    layer = SparseMoE(h, cfg, GatedMLP(h, inner)).to(DEV, torch.bfloat16)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=h ** -0.5)
    layer.fuse_projections()
    return layer


def time_parts(layer: SparseMoE, shape: str, t: int, draws: int = 20) -> dict:
    e, k, h, inner = MOE_SHAPES[shape]
    ops = FusedOps(torch.zeros(t, dtype=torch.long, device=DEV), torch.ones(64, device=DEV))
    gate, experts, shared = layer.gate, layer.experts, layer.shared_experts
    xs = [torch.randn(t, h, device=DEV, dtype=torch.bfloat16) for _ in range(draws)]
    routed = [gate(x, "triton") for x in xs]
    cases = [(x, w, i) for x, (w, i) in zip(xs, routed)]
    touched = sum(int(i.unique().numel()) for _, i in routed) / draws
    bias, routing = gate.expert_bias, gate.routing
    # The shared expert as expert E of a stacked copy, every token's (k+1)-th pair at weight 1.
    w13_plus = torch.cat([experts.w13, torch.cat([shared.gate_proj.weight, shared.up_proj.weight])[None]])
    w2_plus = torch.cat([experts.w2, shared.down_proj.weight[None]])
    folded = [(x, torch.cat([w, torch.ones(t, 1, device=DEV)], 1), torch.cat([i, torch.full((t, 1), e, device=DEV)], 1))
              for x, (w, i) in zip(xs, routed)]
    ms = {
        "router_casts": time_graph_ms(rotating(lambda x: moe_route(F.linear(x.float(), gate.weight.float()), bias,
                                                                    routing, "triton"), [(x,) for x in xs])),
        "router_kernel": time_graph_ms(rotating(lambda x: gate(x, "triton"), [(x,) for x in xs])),
        "experts": time_graph_ms(rotating(lambda x, w, i: fused_moe(x, experts.w13, experts.w2, w, i, "triton"),
                                           cases)),
        "shared": time_graph_ms(rotating(lambda x: x + shared(x, ops), [(x,) for x in xs])),
        "shared_folded": time_graph_ms(rotating(lambda x, w, i: fused_moe(x, w13_plus, w2_plus, w, i, "triton"),
                                                 folded)),
        "layer": time_graph_ms(rotating(lambda x: layer(x, ops), [(x,) for x in xs])),
    }
    for be, bk, programs in LOGIT_TILES:
        ms[f"logits {be}/{bk}/p{programs}"] = time_graph_ms(rotating(
            lambda x, be=be, bk=bk, p=programs: router_logits_triton(x, gate.weight, be, bk, p), [(x,) for x in xs]))
    logits = [(F.linear(x.float(), gate.weight.float()),) for x in xs]
    for warps in (1, 2, 4):
        ms[f"route w{warps}"] = time_graph_ms(rotating(
            lambda lg, w=warps: moe_route_triton(lg, bias, routing, None, w), logits))
    expert_bytes = touched * 3 * h * inner * 2
    router_bytes, shared_bytes = e * h * 2, 3 * h * inner * 2
    bw = hbm_bytes_per_s()
    floors = {"routed": (expert_bytes + router_bytes) / bw * 1e3,
              "layer": (expert_bytes + router_bytes + shared_bytes) / bw * 1e3}
    row = {"shape": shape, "T": t, "touched_experts": touched, "ms": ms, "floor_ms": floors,
           "routed_over_floor": {"casts": (ms["router_casts"] + ms["experts"]) / floors["routed"],
                                 "kernel": (ms["router_kernel"] + ms["experts"]) / floors["routed"]},
           "layer_over_floor": ms["layer"] / floors["layer"],
           "folded_layer_estimate_over_floor": (ms["router_kernel"] + ms["shared_folded"]) / floors["layer"]}
    print(f"  {shape} T={t}: {touched:.1f} experts; " + ", ".join(f"{n} {v:.4f}" for n, v in ms.items())
          + f" ms; floors {floors['routed']:.4f} / {floors['layer']:.4f} ms; layer {row['layer_over_floor']:.2f}x",
          flush=True)
    return row


def kernel_breakdown(layer: SparseMoE, shape: str, t: int = 1, calls: int = 50) -> list[dict]:
    """Device time per kernel of the layer's forward at ``t`` rows (eager calls, profiled)."""
    from torch.profiler import ProfilerActivity, profile

    h = MOE_SHAPES[shape][2]
    ops = FusedOps(torch.zeros(t, dtype=torch.long, device=DEV), torch.ones(64, device=DEV))
    xs = [torch.randn(t, h, device=DEV, dtype=torch.bfloat16) for _ in range(calls)]
    for x in xs[:3]:
        layer(x, ops)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for x in xs:
            layer(x, ops)
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        device_us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if device_us and ev.count:
            rows.append({"kernel": ev.key[:90], "count": ev.count, "us_per_call": device_us / calls})
    rows.sort(key=lambda r: -r["us_per_call"])
    for r in rows:
        print(f"    {r['us_per_call']:8.2f} us x{r['count'] // calls}  {r['kernel']}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shape", default="llada2-mini")
    parser.add_argument("--rows", default="1,2,4,8,32")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("moe_layer_parts needs CUDA")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": __import__("triton").__version__, "hbm_bytes_per_s": hbm_bytes_per_s()}}
    with torch.inference_mode():
        layer = build_layer(args.shape)
        result["parts"] = [time_parts(layer, args.shape, int(t)) for t in args.rows.split(",")]
        (out / "moe_layer_parts.json").write_text(json.dumps(result, indent=1))
        print("  kernels of one forward at 1 row:")
        result["kernels_at_1_row"] = kernel_breakdown(layer, args.shape)
    (out / "moe_layer_parts.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'moe_layer_parts.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
