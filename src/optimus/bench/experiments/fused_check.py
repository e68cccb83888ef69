"""GPU check of the fused decoder-layer kernels (CUDA only, well under a minute).

(a) Each fused kernel vs its torch reference in bf16 on 8B shapes (plus fp32 rotary at long
    positions, which tests the in-kernel angle reduction), and one whole decoder layer:
    fused bf16 and unfused bf16 outputs, each against the same layer run in fp32.
(b) One decoder layer timed inside a CUDA graph, T in {1, 32, 1024} rows (requests of up to
    32 rows over a 512-token paged cache, the engine's PagedBackend), three variants:
      unfused   torch ops, separate q/k/v and gate/up matmuls (the torch path)
      ops       fused elementwise kernels, separate matmuls
      fused     fused kernels + merged q/k/v and gate/up matmuls (what the engine runs)
    with the kernel launches per layer counted by the profiler.

  PYTHONPATH=src python -m optimus.bench.experiments.fused_check --out fused_check.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from optimus.bench.experiments.gpu_timing import time_graph_ms
from optimus.executor.kv_storage import KVCacheStorage
from optimus.executor.runner import PagedBackend, StepBatch
from optimus.kernels import fused
from optimus.kernels.reference import rms_norm_reference, rotary_qk_reference, silu_mul_reference
from optimus.models.layers import DecoderLayer, FusedOps, RotaryEmbedding, layer_ops
from optimus.models.spec import ArchConfig

SHAPES = {  # 8B decoder layers: SDAR-8B (Qwen3: q/k norm, GQA 32/8), LLaDA-8B (MHA)
    "sdar-8b": ArchConfig(vocab_size=1024, hidden_size=4096, num_layers=1, num_heads=32, num_kv_heads=8,
                          head_dim=128, intermediate_size=12288, rope_theta=1e6, qk_norm=True),
    "llada-8b": ArchConfig(vocab_size=1024, hidden_size=4096, num_layers=1, num_heads=32, num_kv_heads=32,
                           head_dim=128, intermediate_size=12288, rope_theta=5e5, rms_eps=1e-5),
}
ROWS = (1, 32, 1024)
CACHE = 512
PAGE = 16
BF16 = dict(atol=1.6e-2, rtol=1.6e-2)  # one bf16 rounding step apart


def _close(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> dict:
    err = (got.float() - want.float()).abs()
    bad = err > atol + rtol * want.float().abs()
    return {"max_abs_err": float(err.max()), "mismatch_frac": float(bad.float().mean()),
            "exact_frac": float((err == 0).float().mean()), "ok": not bool(bad.any())}


def check_kernels(dev: str) -> dict:
    gen = torch.Generator(device=dev).manual_seed(0)
    bf = torch.bfloat16
    rnd = lambda *s, dtype=bf: torch.randn(*s, generator=gen, device=dev).to(dtype)  # noqa: E731
    out = {}
    for t in (1, 1024):
        x, r, w = rnd(t, 4096), rnd(t, 4096), (1 + 0.1 * rnd(4096, dtype=torch.float32)).to(bf)
        y, h = fused.rms_norm(x, w, 1e-6, r)
        ry, rh = rms_norm_reference(x, w, 1e-6, r)
        out[f"rms_norm_residual_T{t}"] = {"y": _close(y, ry, **BF16), "h_exact": bool(torch.equal(h, rh))}
        out[f"rms_norm_T{t}"] = _close(fused.rms_norm(x, w, 1e-6)[0], rms_norm_reference(x, w, 1e-6)[0], **BF16)
    t = 1024
    pos = torch.randint(0, 32768, (t,), generator=gen, device=dev)
    inv = RotaryEmbedding(128, 1e6).inv_freq.to(dev)
    qkv = rnd(t, 48 * 128)  # q/k as column views of one merged projection output
    q, k = qkv[:, :4096].view(t, 32, 128), qkv[:, 4096:5120].view(t, 8, 128)
    norm = fused.QKNorm((1 + 0.1 * rnd(128, dtype=torch.float32)).to(bf),
                        (1 + 0.1 * rnd(128, dtype=torch.float32)).to(bf), 1e-6)
    for name, n in (("rotary_qk", None), ("rotary_qk_qknorm", norm)):
        gq, gk = fused.rotary_qk(q, k, pos, inv, n)
        rq, rk = rotary_qk_reference(q, k, pos, inv, *((n.q_weight, n.k_weight, n.eps) if n else ()))
        out[name] = {"q": _close(gq, rq, **BF16), "k": _close(gk, rk, **BF16)}
    far = torch.randint(0, 131072, (t,), generator=gen, device=dev)
    q32, k32 = q.float(), k.float()
    gq, gk = fused.rotary_qk(q32, k32, far, inv)
    rq, rk = rotary_qk_reference(q32, k32, far, inv)
    out["rotary_qk_fp32_pos_to_131072"] = {"q": _close(gq, rq, 1e-4, 1e-4), "k": _close(gk, rk, 1e-4, 1e-4)}
    gu = rnd(t, 2 * 12288) * 3
    out["silu_mul"] = _close(fused.silu_mul(gu), silu_mul_reference(gu), **BF16)
    return out


def _verdicts(tree: dict) -> list[bool]:
    """Every "ok" / "h_exact" flag in a nested result dict."""
    flags = [bool(v) for k, v in tree.items() if k in ("ok", "h_exact")]
    return flags + [f for v in tree.values() if isinstance(v, dict) for f in _verdicts(v)]


def make_layer(arch: ArchConfig, dev: str, seed: int = 0) -> DecoderLayer:
    """An fp32 layer with random weights, initialised on the device (fast)."""
    with torch.device(dev):
        layer = DecoderLayer(arch, 0)
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
    return layer.eval()


def make_step(arch: ArchConfig, rows: int, dtype: torch.dtype, dev: str) -> tuple[KVCacheStorage, StepBatch]:
    """Requests of min(rows, 32) new rows each (one group), each over a CACHE-token cache."""
    chunk = min(rows, 32)
    reqs = rows // chunk
    pages = CACHE // PAGE
    storage = KVCacheStorage(arch, reqs * pages + 1, PAGE, dtype, torch.device(dev))
    for cache in storage.keys + storage.values:
        cache.normal_()
    table = torch.arange(reqs * pages, dtype=torch.int32, device=dev).view(reqs, pages)
    positions = (CACHE + torch.arange(chunk, device=dev)).repeat(reqs)
    batch = StepBatch(
        input_ids=torch.zeros(rows, dtype=torch.long, device=dev), positions=positions,
        groups=torch.zeros(rows, dtype=torch.int32, device=dev),
        slots=torch.full((rows,), -1, dtype=torch.long, device=dev),  # cache stays as built
        cu_q=(torch.arange(reqs + 1, device=dev) * chunk).to(torch.int32),
        cache_lens=torch.full((reqs,), CACHE, dtype=torch.int32, device=dev), page_table=table,
        logit_rows=torch.zeros(0, dtype=torch.long, device=dev), max_q_len=chunk)
    return storage, batch


def run_layer(layer: DecoderLayer, rope: RotaryEmbedding, x, residual, storage, batch, mode: str):
    """One middle layer: x is the previous MLP output, residual the stream before it."""
    ops = layer_ops(mode, x, batch.positions, rope)
    return layer(x, residual, ops, PagedBackend(storage, batch, "auto"))


def check_layer(arch: ArchConfig, dev: str) -> dict:
    """Fused and unfused bf16 layer outputs, each against the fp32 layer (same weights)."""
    storage, batch = make_step(arch, 1024, torch.float32, dev)
    rope = RotaryEmbedding(arch.head_dim, arch.rope_theta).to(dev)
    gen = torch.Generator(device=dev).manual_seed(1)
    x, res = (torch.randn(1024, arch.hidden_size, generator=gen, device=dev) for _ in range(2))
    layer = make_layer(arch, dev)
    truth = run_layer(layer, rope, x, res, storage, batch, "torch")
    layer = layer.to(torch.bfloat16)
    bf_storage = KVCacheStorage(arch, storage.keys[0].shape[0], PAGE, torch.bfloat16, torch.device(dev))
    bf_storage.keys[0].copy_(storage.keys[0])
    bf_storage.values[0].copy_(storage.values[0])
    out = {}
    for name, mode, merge in (("unfused_bf16", "torch", False), ("fused_bf16", "triton", True)):
        if merge:
            layer.fuse_projections()
        got = run_layer(layer, rope, x.bfloat16(), res.bfloat16(), bf_storage, batch, mode)
        out[name] = {part: float((g.float() - w).norm() / w.norm())
                     for part, g, w in zip(("mlp_out", "residual"), got, truth)}
    out["metric"] = "relative L2 error vs the fp32 layer; fused should be no worse than unfused"
    return out


def count_kernels(fn) -> int | None:
    try:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:  # noqa: BLE001 - the count is informative only (CUPTI may be missing)
        return None


VARIANTS = (("unfused", "torch", False), ("ops", "triton", False), ("fused", "triton", True))


def time_layers(arch: ArchConfig, dev: str) -> list[dict]:
    """Variants in VARIANTS order on one layer: projections are merged before the last."""
    rope = RotaryEmbedding(arch.head_dim, arch.rope_theta).to(dev)
    layer = make_layer(arch, dev).to(torch.bfloat16)
    steps = {rows: make_step(arch, rows, torch.bfloat16, dev) for rows in ROWS}
    results = {rows: {"T": rows} for rows in ROWS}
    for name, mode, merge in VARIANTS:
        if merge:
            layer.fuse_projections()
        for rows, (storage, batch) in steps.items():
            x = torch.randn(rows, arch.hidden_size, device=dev, dtype=torch.bfloat16)
            res = torch.randn_like(x)
            ops = layer_ops(mode, x, batch.positions, rope)
            assert isinstance(ops, FusedOps) == (mode == "triton")
            backend = PagedBackend(storage, batch, "auto")
            fn = lambda: layer(x, res, ops, backend)  # noqa: E731
            results[rows][f"{name}_ms"] = time_graph_ms(fn, calls=10, replays=10)
            results[rows][f"{name}_kernels"] = count_kernels(fn)
    for row in results.values():
        row["speedup"] = row["unfused_ms"] / row["fused_ms"]
    return list(results.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON results path")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fused_check needs CUDA")
    dev, t0 = "cuda", time.time()
    with torch.inference_mode():
        kernels = check_kernels(dev)
        layers = {s: check_layer(SHAPES[s], dev) for s in args.shapes}
        timing = {s: time_layers(SHAPES[s], dev) for s in args.shapes}
    ok = all(_verdicts(kernels))
    print(f"kernel checks: {'PASS' if ok else 'FAIL'}")
    for name, res in kernels.items():
        print(f"  {name}: {json.dumps(res)}")
    for shape, res in layers.items():
        print(f"layer accuracy {shape}: {json.dumps(res)}")
    for shape, rows in timing.items():
        print(f"\n{shape}: one decoder layer, CUDA-graph replay, ms per layer (kernels per layer)")
        print(f"{'T':>6} {'unfused':>16} {'ops only':>16} {'fused':>16} {'speedup':>8}")
        for r in rows:
            cells = [f"{r[f'{n}_ms']:.4f} ({r[f'{n}_kernels']})" for n, _, _ in VARIANTS]
            print(f"{r['T']:>6} " + " ".join(f"{c:>16}" for c in cells) + f" {r['speedup']:>7.2f}x")
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "cache_len": CACHE, "page_size": PAGE,
            "wall_s": round(time.time() - t0, 1),
            "timing": "ms per layer call from CUDA-graph replays (10 calls per graph, median of 5)"}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "kernels_ok": ok, "kernels": kernels, "layer_accuracy": layers,
                   "timing": timing}, f, indent=1)
    print(f"\nwrote {args.out} ({meta['wall_s']} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
