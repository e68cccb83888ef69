"""Micro-benchmark of the ragged group-attention kernel against SDPA (flash) on CUDA.

Uniform cases (every request: same cache length, one chunk of C new rows forming one
group) are what SDPA can express on dense tensors, so both compute the same thing: ours
reads K/V through a shuffled page table, SDPA reads a dense [B, H, cache+C, D] tensor.
Causal prefill (cache 0, group = position) is compared with SDPA's is_causal. Times are
per call from CUDA-graph replays (what the engine runs; launch overhead excluded), with
eager do_bench medians alongside. Where the default config splits the cached keys (small
grids: batch 1-8 decode), the config picked with split-KV off is timed too ("unsplit ms"),
so one run shows what split-KV buys. Also checks the kernel against the torch reference
on ragged batches.

  PYTHONPATH=src python -m optimus.bench.experiments.attention_micro --out results.json [--sweep]
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from optimus.bench.experiments.gpu_timing import time_graph_ms
from optimus.kernels import group_attention, visible_key_end, write_kv

SHAPES = {"llada-8b": (32, 32, 128), "sdar-8b": (32, 8, 128)}  # (Hq, Hkv, D)


@dataclass(frozen=True)
class Step:
    """One ragged step on the device, with per-step metadata precomputed like the engine."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    page_table: torch.Tensor
    cache_lens: torch.Tensor
    cu_q: torch.Tensor
    groups: torch.Tensor
    key_end: torch.Tensor
    max_q_len: int

    def attend(self, backend: str = "auto", config=None) -> torch.Tensor:
        if config is not None:
            from optimus.kernels._group_attention_triton import group_attention_triton
            return group_attention_triton(self.q, self.k, self.v, self.k_cache, self.v_cache,
                                          self.page_table, self.cache_lens, self.cu_q, self.groups,
                                          None, self.max_q_len, self.key_end, config)
        return group_attention(self.q, self.k, self.v, self.k_cache, self.v_cache, self.page_table,
                               self.cache_lens, self.cu_q, self.groups, backend=backend,
                               max_q_len=self.max_q_len, key_end=self.key_end)


def build_step(specs: list[tuple[int, list[int]]], hq: int, hkv: int, d: int, page_size: int,
               dtype: torch.dtype, device: str, seed: int = 0) -> Step:
    """specs: per request (cache_len, groups of its new rows); pages shuffled across requests."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    need = [math.ceil(c / page_size) for c, _ in specs]
    num_pages = sum(need) + 1
    k_cache = torch.empty(num_pages, page_size, hkv, d, dtype=dtype, device=device)
    v_cache = torch.empty_like(k_cache)
    table = torch.zeros(len(specs), max(need + [1]), dtype=torch.int32)
    perm, used = torch.randperm(num_pages, generator=gen), 0
    slots = []
    for r, (c, _) in enumerate(specs):
        table[r, :need[r]] = perm[used:used + need[r]].to(torch.int32)
        used += need[r]
        slots += [int(table[r, p // page_size]) * page_size + p % page_size for p in range(c)]
    total = len(slots)
    # Fill the cache through write_kv, which the engine uses as well.
    ck = torch.randn(total, hkv, d, generator=gen).to(device, dtype)
    cv = torch.randn(total, hkv, d, generator=gen).to(device, dtype)
    write_kv(ck, cv, k_cache, v_cache, torch.tensor(slots, dtype=torch.int64, device=device))
    lens = [len(g) for _, g in specs]
    t = sum(lens)
    rnd = lambda h: torch.randn(t, h, d, generator=gen).to(device, dtype)  # noqa: E731
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32).to(device)
    groups = torch.tensor([g for _, gs in specs for g in gs], dtype=torch.int32, device=device)
    return Step(rnd(hq), rnd(hkv), rnd(hkv), k_cache, v_cache, table.to(device),
                torch.tensor([c for c, _ in specs], dtype=torch.int32, device=device), cu, groups,
                visible_key_end(cu, groups), max(lens))


def dense_equivalent(step: Step, batch: int, chunk: int, cache: int):
    """Uniform step -> SDPA tensors q [B, Hq, C, D], k/v [B, Hkv, cache + C, D]."""
    hq, hkv, d = step.q.shape[1], step.k.shape[1], step.q.shape[2]
    ps = step.k_cache.shape[1]
    pos = torch.arange(cache, device=step.q.device)
    pages = step.page_table[:, pos // ps].long()
    kc, vc = step.k_cache[pages, pos % ps], step.v_cache[pages, pos % ps]  # [B, cache, Hkv, D]
    k = torch.cat([kc, step.k.view(batch, chunk, hkv, d)], 1).transpose(1, 2).contiguous()
    v = torch.cat([vc, step.v.view(batch, chunk, hkv, d)], 1).transpose(1, 2).contiguous()
    return step.q.view(batch, chunk, hq, d).transpose(1, 2).contiguous(), k, v


def sdpa_flash(q, k, v, causal: bool = False):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def time_ms(fn) -> float:
    """Eager median per call (includes Python and launch overhead when the GPU work is short)."""
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))


def default_config(step: Step, split_kv: bool = True):
    """The tile config the wrapper picks for this step; split_kv=False: the pre-split-KV pick."""
    from optimus.kernels._group_attention_triton import default_config as pick
    return pick(step.cu_q.numel() - 1, step.q.shape[1], step.k.shape[1], step.q.shape[2],
                step.max_q_len, step.q.device, split_kv)


def sweep_configs(gqa_pad: int, default):
    """Candidate tiles (unsplit), then the default tile at several split counts."""
    from optimus.kernels._group_attention_triton import MAX_SPLITS, TileConfig
    seen = []
    for m, n, warps, stages in [(16, 64, 4, 2), (16, 128, 4, 2), (32, 64, 4, 2), (32, 64, 4, 3),
                                (32, 64, 4, 4), (32, 64, 8, 3), (32, 128, 4, 2), (32, 128, 8, 2),
                                (32, 32, 4, 3), (64, 32, 4, 3), (64, 64, 4, 4), (64, 128, 8, 2),
                                (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3),
                                (128, 128, 8, 2)]:
        if m >= gqa_pad:
            cfg = TileConfig(m // gqa_pad, n, warps, stages)
            if cfg not in seen:
                seen.append(cfg)
    # The default tile at each split count (2 and 4 only where the default does not split:
    # does a grid that already fills the GPU gain from shorter key ranges?).
    for splits in (1, 2, 4, 8, MAX_SPLITS) if default.num_splits > 1 else (2, 4):
        if replace(default, num_splits=splits) not in seen:
            seen.append(replace(default, num_splits=splits))
    return seen


def config_name(cfg, gqa_pad: int) -> str:
    name = f"{cfg.block_q}x{gqa_pad}_n{cfg.block_n}_w{cfg.num_warps}_s{cfg.num_stages}"
    return name + (f"_split{cfg.num_splits}" if cfg.num_splits > 1 else "")


def bench_case(model: str, batch: int, chunk: int, cache: int, page_size: int, sweep: bool) -> dict:
    """cache > 0: one bidirectional chunk group per request; cache == 0: causal prefill."""
    hq, hkv, d = SHAPES[model]
    causal = cache == 0
    groups = list(range(chunk)) if causal else [0] * chunk
    step = build_step([(cache, groups)] * batch, hq, hkv, d, page_size, torch.bfloat16, "cuda")
    q, k, v = dense_equivalent(step, batch, chunk, cache)
    ours = step.attend()
    ref = sdpa_flash(q, k, v, causal).transpose(1, 2).reshape_as(ours)
    row = {"kind": "prefill" if causal else "decode", "model": model, "batch": batch, "chunk": chunk,
           "cache": cache, "max_abs_err_vs_sdpa": float((ours.float() - ref.float()).abs().max()),
           "ours_ms": time_graph_ms(lambda: step.attend()),
           "sdpa_flash_ms": time_graph_ms(lambda: sdpa_flash(q, k, v, causal)),
           "ours_eager_ms": time_ms(lambda: step.attend()),
           "sdpa_flash_eager_ms": time_ms(lambda: sdpa_flash(q, k, v, causal))}
    kv_bytes = 2 * batch * (cache + chunk) * hkv * d * 2
    row["ours_kv_GBps"] = kv_bytes / row["ours_ms"] / 1e6
    pairs = batch * (chunk * (chunk + 1) // 2 if causal else chunk * (cache + chunk))
    row["ours_tflops"] = 4 * pairs * hq * d / row["ours_ms"] / 1e9
    row["speedup_vs_sdpa"] = row["sdpa_flash_ms"] / row["ours_ms"]
    gqa_pad = 1 << (hq // hkv - 1).bit_length()
    cfg = default_config(step)
    row["config"], row["num_splits"] = config_name(cfg, gqa_pad), cfg.num_splits
    if cfg.num_splits > 1:  # the config picked with split-KV off: the "before"
        unsplit = default_config(step, split_kv=False)
        row["unsplit_config"] = config_name(unsplit, gqa_pad)
        row["ours_unsplit_ms"] = time_graph_ms(lambda: step.attend(config=unsplit))
        row["split_speedup"] = row["ours_unsplit_ms"] / row["ours_ms"]
    if sweep:
        timings = {config_name(c, gqa_pad): time_graph_ms(lambda c=c: step.attend(config=c))
                   for c in sweep_configs(gqa_pad, cfg)}
        best = min(timings, key=timings.get)
        row["sweep"], row["best_config"], row["best_ms"] = timings, best, timings[best]
    return row


def ragged_checks(page_size: int) -> list[dict]:
    """Kernel vs torch reference (fp32 softmax) on mixed ragged batches, bf16 and fp16."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for model, (hq, hkv, d) in SHAPES.items():
        for dtype in (torch.bfloat16, torch.float16):
            specs = []
            for r in range(12):
                cache = int(torch.randint(0, 700, (1,), generator=gen)) if r % 4 else 0
                n = int(torch.randint(1, 70, (1,), generator=gen))
                kind = r % 3
                groups = ([cache + i for i in range(n)] if kind == 0 else
                          [(cache + i) // 32 for i in range(n)] if kind == 1 else
                          [0] * (n // 3) + [1] * (n - n // 3))
                specs.append((cache, groups))
            step = build_step(specs, hq, hkv, d, page_size, dtype, "cuda", seed=len(out))
            got, want = step.attend("triton"), step.attend("torch")
            err = float((got.float() - want.float()).abs().max())
            out.append({"model": model, "dtype": str(dtype), "rows": int(step.q.shape[0]),
                        "max_abs_err_vs_reference": err, "ok": err < (3e-2 if dtype == torch.bfloat16 else 4e-3)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--cache", type=int, default=512)
    parser.add_argument("--prefill", type=int, default=1024, help="causal prefill length per request")
    parser.add_argument("--sweep", action="store_true", help="also time candidate tile configs")
    parser.add_argument("--only", default="", help="comma-separated MODEL:BATCH:CHUNK decode cases "
                        "(e.g. llada-8b:8:32); default: every case")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_micro needs a CUDA device")
    checks = ragged_checks(args.page_size)
    for c in checks:
        print(f"ragged {c['model']:9s} {c['dtype']:15s} rows={c['rows']:4d} "
              f"max_err={c['max_abs_err_vs_reference']:.2e} {'ok' if c['ok'] else 'FAIL'}")
    rows = []
    print(f"{'kind':7s} {'model':9s} {'B':>4s} {'C':>5s} {'ours ms':>9s} {'sdpa ms':>9s} {'speedup':>8s} "
          f"{'splits':>6s} {'unsplit ms':>10s} {'KV GB/s':>8s} {'TFLOP/s':>8s} {'err':>8s}  "
          "best sweep config (ms)")
    cases = [(m, b, c, args.cache) for m in SHAPES for b in (1, 8, 32, 128) for c in (1, 4, 32)]
    cases += [(m, b, args.prefill, 0) for m in SHAPES for b in (1, 4)]
    if args.only:
        picked = [c.split(":") for c in args.only.split(",")]
        cases = [(m, int(b), int(c), args.cache) for m, b, c in picked]
    for model, batch, chunk, cache in cases:
        r = bench_case(model, batch, chunk, cache, args.page_size, args.sweep)
        rows.append(r)
        unsplit = f"{r['ours_unsplit_ms']:10.4f}" if "ours_unsplit_ms" in r else f"{'-':>10s}"
        print(f"{r['kind']:7s} {model:9s} {batch:4d} {chunk:5d} {r['ours_ms']:9.4f} {r['sdpa_flash_ms']:9.4f} "
              f"{r['speedup_vs_sdpa']:8.2f} {r['num_splits']:6d} {unsplit} "
              f"{r['ours_kv_GBps']:8.0f} {r['ours_tflops']:8.1f} "
              f"{r['max_abs_err_vs_sdpa']:8.1e}  "
              f"{r.get('best_config', '')} {r.get('best_ms', 0):.4f}")
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "page_size": args.page_size, "cache": args.cache, "dtype": "bfloat16",
            "timing": "*_ms: per call from CUDA-graph replays; *_eager_ms: triton do_bench median; "
                      "ours = the group_attention wrapper with per-step metadata precomputed; "
                      "ours_unsplit_ms = the config picked with split-KV off (only where ours splits)"}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "ragged_checks": checks, "cases": rows}, f, indent=1)


if __name__ == "__main__":
    main()
