"""The table of current numbers, generated from the committed results.

Results live in ``benchmarks/results/<card>/<benchmark>/``: ``latest.json`` (with its plots,
``latest.png`` / ``latest_<name>.png``, and ``latest.source``: the date and commit of the
measurement, ``YYYY-MM-DD <commit>``) and the runs it replaced in ``history/``, named
``<date>_<commit>[_<what differs>].<ext>``. This script reads every ``latest.json`` and writes
``docs/results.md``: one table per benchmark with a column per card, GPU cards side by side
(a known card without a file reads "not measured yet"; a card folder that appears, e.g.
``benchmarks/results/h200/``, gains its column).

  python scripts/results_table.py                 # write docs/results.md
  python scripts/results_table.py --check         # exit 1 if docs/results.md is stale
  python scripts/results_table.py store CARD BENCHMARK RESULT.json [PLOT.png ...] [--source "DATE COMMIT"]

``store`` files a new run: the current ``latest*`` files move to ``history/<date>_<commit>...``
(from ``latest.source``), the new files become ``latest*`` and ``latest.source`` records the
given source, or today's date and the checked-out commit (the code that was measured).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "docs" / "results.md"
GPU_CARDS = ("h100", "h200")  # always shown for GPU benchmarks, measured or not
ONE_OFF = {"train"}  # runs that are not repeated per card: only the cards that have them
NOT_MEASURED = "not measured yet"

SHAPES = {"llada-8b": "LLaDA-8B", "llama-8b": "Llama-8B", "sdar-8b": "SDAR-8B", "dream-7b": "Dream-7B"}


# ---------------------------------------------------------------- formatting


def num(v: float) -> str:
    """Throughput-style number: thousands separated, no decimals from 100 up."""
    if v is None:
        return "—"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def shape(name: str) -> str:
    return SHAPES.get(name, name)


def case(row: dict) -> str:
    """'Llama-8B AR' / 'LLaDA-8B 4 tokens/step' for a row of an engine benchmark."""
    s = shape(row.get("shape", "?"))
    if row.get("policy") == "ar":
        return f"{s} AR"
    tps = row.get("tokens_per_step") or (4 if row.get("schedule") == "4 tokens/step" else None)
    return f"{s} {tps} tokens/step" if tps else f"{s} {row.get('policy', '')}".strip()


def rate(r: float) -> str:
    return f"{r:g}"


def requests(n) -> str:
    return f"{n} request{'' if str(n) == '1' else 's'}"


# ---------------------------------------------------------------- extractors: json -> [(label, value)]


def offline_table(d: dict) -> list:
    rows = []
    for key in ("schedule4", "ar"):
        for r in d.get(key, []):
            # Runs before cache modes existed decoded LLaDA under what is now "prefix-block".
            mode = f" {r.get('cache_mode', 'prefix-block')}" if key == "schedule4" else ""
            label = (f"{shape(r['shape'])} {'4 tokens/step' if key == 'schedule4' else 'AR'}{mode}, "
                     f"batch {r['batch']} (tok/s)")
            rows.append((label, num(r["output_tok_s"])))
    return rows


def cache_modes(d: dict) -> list:
    published = d.get("fast_dllm_published_code", {})
    rows = []
    for r in d.get("engine", []):
        label = f"engine {r['cache_mode']}, batch {r['batch']}: tok/s (refresh share of step time)"
        value = f"{num(r['output_tok_s'])} ({pct(r['refresh_time_share'])})"
        base = dict(zip(published.get("batches", []), published.get(r["cache_mode"], [])))
        if r["batch"] in base:
            value += f"; {r['output_tok_s'] / base[r['batch']]:.1f}x Fast-dLLM's {num(base[r['batch']])}"
        rows.append((label, value))
    for r in d.get("fast_dllm_reference_loop", []):
        rows.append((f"reference loop {r['loop']} (dense torch), batch {r['batch']} (tok/s)", num(r["output_tok_s"])))
    return rows


def hf_generate_compare(d: dict) -> list:
    return [(f"batch {r['batch']}: this engine / HF generate (tok/s)",
             f"{num(r['optimus_tok_s'])} / {num(r['hf_tok_s'])} = {r['ratio']:.1f}x") for r in d.get("rows", [])]


def sampling_throughput(d: dict) -> list:
    def cell(v):
        return "n/a (see the JSON's note)" if v is None else num(v)
    label = "{model} {policy}, batch {batch}" if d.get("rows") and "model" in d["rows"][0] else \
        "call {call}, {code}: {policy}, batch {batch}"
    return [(label.format(**r) + ": greedy / sampled (tok/s)",
             " / ".join(cell(r[m]["tok_per_s"] if isinstance(r[m], dict) else r[m]) for m in ("greedy", "sampled")))
            for r in d.get("rows", [])]


def conversion_dry_run(d: dict) -> list:
    sc, fit, ev = d["selfchat"], d["fit"], d["eval"]
    rows = [("self-chat: answers finished / questions (answer tokens, tok/s)",
             f"{sc['answers_finished']} / {sc['questions_kept']} ({num(sc['answer_tokens'])}, {num(sc['answer_tok_per_s'])})"),
            ("fit: steps, first (compiling) step s, held-out loss",
             f"{fit['steps']}, {fit['first_step_seconds_observed']:.0f}, {fit['heldout_loss']:.2f}")]
    base = ev["ar_own"]
    for name, r in ev.items():
        if isinstance(r, dict) and name != "ar_own":
            rows.append((f"{name}: tau, NLL under base (ratio), rep4 (base), length (base)",
                         f"{r['tau']:.2f}, {r['nll_under_base']:.2f} ({r['nll_ratio']:.2f}x), "
                         f"{r['rep4']:.2f} ({base['rep4']:.2f}), {r['length']:.0f} ({base['length']:.0f})"))
    return rows


def smollm2_conversion(d: dict) -> list:
    sc, ar = d["selfchat"], d["ar_base_chat300"]
    rows = [("self-chat data: conversations (answer tokens)", f"{sc['conversations']} ({num(sc['answer_tokens'])})")]
    for b, r in sorted(d.get("sweep", {}).get("rows", {}).items(), key=lambda kv: int(kv[0])):
        rows.append((f"sweep, block {b}: steps, tau, NLL ratio (held-out self-chat)",
                     f"{r['steps']}, {r['tau']:.2f}, {r['nll_ratio']:.2f}x"))
    rows.append(("AR base on chat300: arithmetic / factual accuracy, prose rep4, length",
                 f"{ar['accuracy']['arithmetic']:.2f} / {ar['accuracy']['factual']:.2f}, "
                 f"{ar['prose']['rep4']:.2f}, {ar['prose']['length']:.0f}"))
    for name, run in d["runs"].items():
        shipped = " (shipped)" if name == d.get("shipped") else ""
        rows.append((f"{name}{shipped}: training tokens, held-out loss",
                     f"{num(run['train']['tokens'] / 1e6)}M, {run['train']['heldout_loss']:.2f}"))
        for config, r in run["chat300"].items():
            vs = r["vs_ar"]
            rows.append((f"{name} {config}: accuracy pts vs AR (arith, fact), NLL / rep4 / length ratio, tau",
                         f"{vs['arithmetic_points']:+.0f}, {vs['factual_points']:+.0f}; {vs['nll_ratio']:.2f} / "
                         f"{vs['rep4_ratio']:.2f} / {vs['length_ratio']:.2f}; {r['tau']:.2f}"))
    return rows


def fp8_accuracy(d: dict) -> list:
    ref, fp8 = d["reference"], d["fp8"]
    rows = [("accuracy, all tasks: reference / FP8", f"{ref['accuracy']:.3f} / {fp8['accuracy']:.3f}"),
            ("tokens per step: reference / FP8", f"{ref['tau']['mean']:.2f} / {fp8['tau']['mean']:.2f}")]
    return rows + [(f"{task}: reference / FP8", f"{acc:.2f} / {fp8['tasks'][task]:.2f}")
                   for task, acc in sorted(ref["tasks"].items())]


def moe_check(d: dict) -> list:
    rows = [] if "kernel_ok" not in d else [
        ("Triton MoE kernel within bf16 tolerance, graph replay follows new routing", "yes" if d["kernel_ok"] else "NO")]
    for t in d.get("decode_timing", []):
        label, value = "Triton ms (TB/s)", f"{t['triton_ms']:.3f} ({t['triton_TBps']:.2f})"
        if "touched_ms" in t:  # the default path's time, then each path's
            paths = {"pairs": t["pairs_ms"][next(iter(t["pairs_ms"]))], "grouped": t["grouped_ms"],
                     "touched": t["touched_ms"]}
            label = f"default ({t['default_path']}) ms (TB/s); pairs / grouped / touched ms"
            value += "; " + " / ".join(f"{v:.3f}" for v in paths.values())
        rows.append((f"{shape(t['shape'])} experts, {t['T']} rows ({t['touched_experts']:.0f} experts, "
                     f"{t['weight_MB']:.0f} MB): {label}", value))
    for t in d.get("decode_timing_local", []):
        ms = t["ms"]
        paths = ["default", "pairs", "grouped"] + [n for n in ms if n.startswith("touched")][:1]  # the default tiles
        rows.append((f"{shape(t['shape'])} experts, mask-row routing, {t['requests']} x {t['rows_per_request']} rows "
                     f"({t['touched_experts']:.0f} experts, {t['weight_MB']:.0f} MB): "
                     f"{' / '.join(n.split()[0] for n in paths)} ms", " / ".join(f"{ms[n]:.3f}" for n in paths)))
    for t in d.get("layer_timing", []):
        rows.append((f"{shape(t['shape'])} routed layer, {t['T']} rows: ms, x its weight-read floor (torch routing ms)",
                     f"{t['layer_ms']:.3f}, {t['layer_over_floor']:.2f}x ({t['layer_torch_route_ms']:.3f})"))
    for r in d.get("schedule4", []):
        graphs = "" if r.get("graph_max_tokens", "default") == "default" else f", graphs to {r['graph_max_tokens']} tokens"
        if "moe_dispatch" in r:  # PAIRS:TOUCHED limits of the MoE path (moe_check --dispatch)
            graphs += f", MoE paths {r['moe_dispatch']}"
        rows.append((f"{shape(r['shape'])} 4 tokens/step {r['cache_mode']}{graphs}, batch {r['batch']} (tok/s)",
                     num(r["output_tok_s"])))
        if "step_floor_ms" in r:
            rows.append((f"{shape(r['shape'])}{graphs} batch {r['batch']}: mean step ms, x its weight-read floor",
                         f"{r['mean_step_ms']:.2f}, {r['step_over_floor']:.2f}x"))
    return rows


def moe_rows(d: dict) -> list:
    rows = []
    for (batch, chunk), cells in itertools.groupby(d["cells"], key=lambda c: (c["batch"], c["chunk"])):
        cells = list(cells)
        rows.append((f"{shape(d['shape'])}, {batch} requests x {chunk} rows, of them "
                     f"{' / '.join(str(c['stored']) for c in cells)} stored: ms a step",
                     " / ".join(f"{c['ms']:.2f}" for c in cells)))
    return rows


def moe_layer_parts(d: dict) -> list:
    rows = []
    for r in d.get("parts", []):
        ms = r["ms"]
        rows.append((f"{shape(r['shape'])}, {r['T']} rows: router casts / kernel, experts, shared, layer (ms; layer / floor)",
                     f"{ms['router_casts']:.4f} / {ms['router_kernel']:.4f}, {ms['experts']:.4f}, {ms['shared']:.4f}, "
                     f"{ms['layer']:.4f} ({r['layer_over_floor']:.2f}x)"))
    return rows


def http_vs_engine(d: dict) -> list:
    rows = []
    for r in d.get("rows", []):
        h = r["http"]
        rows.append((f"{r['policy']}, {r['concurrency']} streams: engine / HTTP tok/s (HTTP/engine; TTFT p50, TPOT p50)",
                     f"{num(r['inprocess']['output_tok_s'])} / {num(h['output_tok_s'])} ({r['http_over_engine']:.3f}; "
                     f"{h['p50_ttft_ms']:.0f} ms, {h['p50_tpot_ms']:.1f} ms)"))
    return rows


def before_after(d: dict) -> list:
    """One row per (experiment, batch): tok/s before / after, each call in its order."""
    rows = []
    first = d["runs"][0]["before"]
    for exp in first:
        for i, row in enumerate(first[exp]):
            cells = "; ".join(f"{num(r['before'][exp][i]['output_tok_s'])} / {num(r['after'][exp][i]['output_tok_s'])}"
                              f" ({' first' if r['order'][0] == 'before' else ' second'} before)".replace("( ", "(")
                              for r in d["runs"])
            rows.append((f"{exp} {shape(row.get('shape', ''))} batch {row['batch']}: before / after tok/s", cells))
    return rows


def host_time(d: dict) -> list:
    """Values in the cells only, so rows of different machines share their labels."""
    rows = []
    for r in d.get("rows", []):
        ms = r["full_batch_ms"]
        phases = [k for k in ("schedule", "build", "commit", "settle", "outputs", "feedback", "cursors", "learning")
                  if k in ms]
        value = f"{ms['total']:.1f}" + (f" ({ms['critical']:.1f} critical)" if "critical" in ms else "")
        shape = f" ({r['shape']})" if "shape" in r else ""
        shape += f", output {r['output_len']}" if "output_len" in r else ""
        rows.append((f"{r['policy']}{shape}, {r['requests']} requests: host ms per step ({' + '.join(phases)})",
                     f"{value}: {' + '.join(f'{ms[k]:.1f}' for k in phases)}"))
    return rows


def host_interleaved(d: dict) -> list:
    return [(f"{r['policy']}, {r['requests']} requests: critical host ms against {d['base']}, before / now (median "
             f"ratio of paired steps)", f"{r['critical_ms_before']:.2f} / {r['critical_ms_now']:.2f} "
             f"({r['paired_ratio']:.3f})") for r in d.get("rows", [])]


def fp8_speed(d: dict) -> list:
    rows = []
    off = d.get("offline", {})
    for kind in ("schedule4", "ar"):
        for a, b in zip(off.get("bf16", {}).get(kind, []), off.get("fp8", {}).get(kind, [])):
            rows.append((f"{kind} {a.get('shape')} batch {a.get('batch')}: bf16 / fp8 tok/s",
                         f"{num(a['output_tok_s'])} / {num(b['output_tok_s'])} ({b['output_tok_s'] / a['output_tok_s']:.2f}x)"))
    for c in d.get("micro", []):
        if c["rows"] in (1, 16, 1024):
            rows.append((f"{c['shape']}, {c['rows']} rows: fp8 / cuBLAS bf16 us (fp8 weight TB/s)",
                         f"{c['fp8_us']:.1f} / {c['cublas_bf16_us']:.1f} ({c['fp8_tb_s']:.2f})"))
    return rows


def host_overlap(d: dict) -> list:
    return [(f"{r['policy']}, {r['requests']} requests: wall / device ms per step (wall over device), tok/s",
             f"{r['wall_ms_per_step']:.1f} / {r['device_ms_per_step']:.1f} ({r['wall_over_device']:.3f}), "
             f"{num(r['output_tok_s'])}") for r in d.get("rows", [])]


def elastic_emulated(d: dict) -> list:
    """Per load: every policy's tok/s and elastic's share of the best single one."""
    out = []
    for n in sorted({r["requests"] for r in d.get("rows", [])}):
        rows = {r["policy"]: r for r in d["rows"] if r["requests"] == n}
        single = {p: r["output_tok_s"] for p, r in rows.items() if p != "elastic"}
        best = max(single, key=single.get)
        cells = ", ".join(f"{p} {num(t)}" for p, t in single.items())
        before = next((r["output_tok_s"] for r in d.get("before", {}).get("rows", [])
                       if r["requests"] == n and r["policy"] == "elastic"), None)
        was = f"; before {num(before)}" if before is not None else ""
        label = f"{n} requests: elastic tok/s / best single (its share); the single policies"
        out.append((label + ("; elastic before" if was else ""),
                    f"{num(rows['elastic']['output_tok_s'])} / {num(single[best])} {best} "
                    f"({rows['elastic']['output_tok_s'] / single[best]:.3f}); {cells}{was}"))
    return out


def emulated_serving(d: dict) -> list:
    """Per rate and policy: throughput, steps, TPOT and what kept the steps in flight."""
    return [(f"{r['policy']}, {rate(r['rate'])} req/s: tok/s; steps x wall ms; TPOT ms; wide plans; kept in flight",
             f"{num(r['output_tok_s'])}; {r['steps']:,} x {r['wall_ms_per_step']:.1f}; {r['mean_tpot_ms']:.1f}; "
             f"{r['plans_with_a_wide_window']:.2f}; {r['steps_kept_in_flight']:.2f}") for r in d.get("rows", [])]


def slow_host(d: dict) -> list:
    """Per policy and rate: the median output tok/s of the runs, and the code before if stored."""
    before = d.get("before", {})
    rows = [(f"{key} req/s: output tok/s, median (runs)",
             f"{num(v['median_tok_s'])} ({', '.join(num(x) for x in v['runs'])})") for key, v in d["summary"].items()]
    rows += [(f"{key} req/s, before ({before['commit']}): output tok/s, median (runs)",
              f"{num(v['median_tok_s'])} ({', '.join(num(x) for x in v['runs'])})")
             for key, v in before.get("summary", {}).items()]
    return rows + [("busy loops sharing the core", str(d.get("busy_loops")))]


def elastic_profile_mismatch(d: dict) -> list:
    return [(f"{r['requests']} requests, profile {r['profile']}: elastic / best single tok/s "
             "(scale, stretch, slope ratio learned)",
             f"{num(r['elastic_tok_s'])} / {num(r['best_single_tok_s'])} {r['best_single']}: "
             f"{r['elastic_over_best']:.3f} ({r['learned_scale']:.2f}, {r['learned_stretch']:.2f}, "
             f"{r.get('learned_slope_ratio', 1.0):.2f})")
            for r in d.get("rows", [])]


def latency_fit(d: dict) -> list:
    rows = [("shape (cache per request)", f"{d.get('shape', '?')} ({d.get('context', '?')})")]
    for where, methods in d.get("summary", {}).items():
        cells = ", ".join(f"{m} {pct(v['median_abs'])} ({pct(v['max_abs'])})" for m, v in methods.items())
        rows.append((f"{where} steps held out: abs. error median (max)", cells))
    return rows


def _best_fixed(values: dict) -> tuple[str, float] | None:
    fixed = {p: v for p, v in values.items() if p.startswith("fixed:") and v is not None}
    return max(fixed.items(), key=lambda kv: kv[1]) if fixed else None


def _vs_best(elastic: float, best: tuple[str, float]) -> str:
    return f"{num(elastic)} vs {num(best[1])} ({best[0]}): {pct(elastic / best[1])}"


def _best_single(values: dict) -> tuple[str, float] | None:
    """The best policy other than elastic (ar counts: it is a chunk size too)."""
    single = {p: v for p, v in values.items() if p != "elastic" and v is not None}
    return max(single.items(), key=lambda kv: kv[1]) if single else None


def policy_sweep(d: dict) -> list:
    rows = []
    sweep = d.get("sweep", [])
    levels = sorted({r["concurrency"] for r in sweep})
    tok = {(r["policy"], r["concurrency"]): r["output_tok_s"] for r in sweep}
    policies = list(dict.fromkeys(r["policy"] for r in sweep))
    for n in levels:
        at = {p: tok.get((p, n)) for p in policies}
        best = _best_single(at)
        if "elastic" in policies and best and at.get("elastic") is not None:
            rows.append((f"{requests(n)}: elastic vs best single policy (tok/s)", _vs_best(at["elastic"], best)))
    complete = [p for p in policies if all((p, n) in tok for n in levels)]  # a sum needs every load
    if len(levels) > 1 and "elastic" in complete:
        sums = {p: sum(tok[(p, n)] for n in levels) for p in complete}
        best = _best_single(sums)
        partial = [p for p in policies if p not in complete]
        if best:
            rows.append(("sum over concurrencies: elastic vs best single policy (tok/s)"
                         + (f"; {', '.join(partial)} not run at every load" if partial else ""),
                         _vs_best(sums["elastic"], best)))
    device = {(r["policy"], r["concurrency"]): r["device_ms_per_step"] * r["steps"] for r in sweep
              if r.get("device_ms_per_step")}
    choice = []  # the best single policy's device time over elastic's: elastic's choices, the host left out
    for n in levels:
        best = _best_single({p: tok.get((p, n)) for p in policies})
        if best and ("elastic", n) in device and (best[0], n) in device:
            choice.append(f"{device[(best[0], n)] / device[('elastic', n)]:.3f}")
    if choice and len(choice) == len(levels):
        loads = " / ".join(map(str, levels))
        rows.append((f"elastic / best single policy in device time (its choices, host left out) at {loads} requests",
                     " / ".join(choice)))
    ratio = {(r["policy"], r["concurrency"]): r["wall_over_device"] for r in sweep if "wall_over_device" in r}
    for n in (64, 256):
        if ("elastic", n) in ratio and ("ar", n) in ratio:
            rows.append((f"{requests(n)}: wall / device time, elastic and ar",
                         f"{ratio[('elastic', n)]:.2f}, {ratio[('ar', n)]:.2f}"))
    if "elastic" in policies and "ar" in policies:
        gains = [tok[("elastic", n)] / tok[("ar", n)] for n in levels if ("elastic", n) in tok and ("ar", n) in tok]
        rows.append((f"elastic / ar at {' / '.join(map(str, levels))} requests",
                     " / ".join(f"{g:.1f}" if g >= 2 else f"{g:.2f}" for g in gains) + "x"))
    if sweep:
        r = sweep[0]
        rows.append(("workload", f"{shape(r.get('shape', '?'))}, {r.get('acceptance', '')}"))
    if "surface" in d:
        rows.append(("latency knee (tokens per step)", f"{d['surface']['knee_tokens']:.0f}"))
    if "profile" in d:
        rows.append(("elastic plans from", d["profile"]))
    return rows


def pipeline_sweep(d: dict) -> list:
    """Each policy whole, in halves (+pipeline) and where the latency curve says halves pay (+auto):
    tok/s with wall time over device time in brackets."""
    sweep = d.get("sweep", [])
    cell = {(r["policy"], r["concurrency"]): f"{num(r['output_tok_s'])} ({r['wall_over_device']:.2f})" for r in sweep}
    bases = list(dict.fromkeys(r["policy"].split("+")[0] for r in sweep))
    rows = []
    for n in sorted({r["concurrency"] for r in sweep}):
        for base in bases:
            modes = [cell.get((base + suffix, n), "-") for suffix in ("", "+pipeline", "+auto")]
            if modes[1:] != ["-", "-"]:
                rows.append((f"{requests(n)}, {base}: whole / halves / auto, tok/s (wall/device)", " / ".join(modes)))
    return rows


def serve_sweep(d: dict) -> list:
    rows = []
    pol = d.get("policies", {})
    tok = {(p, r["request_rate"]): r["output_throughput"] for p, v in pol.items() for r in v.get("runs", [])}
    att = {(p, r["request_rate"]): r["slo_attainment"] for p, v in pol.items() for r in v.get("runs", [])}
    rates = d.get("rates") or sorted({r for _, r in tok})
    if "elastic" in pol:
        for r in rates:
            best = _best_single({p: tok.get((p, r)) for p in pol})
            if best and ("elastic", r) in tok:
                rows.append((f"{rate(r)} req/s: elastic vs best single policy (output tok/s)",
                             _vs_best(tok[("elastic", r)], best)))
    top = max(rates) if rates else None
    for p, v in pol.items():
        cap = v.get("capacity")
        cap_s = f"< {rate(min(rates))}" if cap is None else (f">= {rate(cap)} (top rate)" if cap == top else rate(cap))
        seen = [att[(p, r)] for r in rates if (p, r) in att]
        rows.append((f"capacity of {p} (req/s)", f"{cap_s}; SLO attainment {' / '.join(f'{100 * a:.0f}' for a in seen)}%"))
    slo = d.get("slo_ms", {})
    ds = d.get("dataset", {})
    rows.append(("SLOs and load", f"{' and '.join(f'{k.upper()} {v:,.0f} ms' for k, v in slo.items())}, "
                 f">= {100 * d.get('attainment_target', 0.9):.0f}% within; {ds.get('name', '?')} dataset, "
                 f"{ds.get('num_prompts', '?')} prompts per rate at {' / '.join(rate(r) for r in rates)} req/s"))
    return rows


def gpu_check(d: dict) -> list:
    cases = {k: v for k, v in d.items() if isinstance(v, dict)}
    checks = [ok for v in cases.values() for ok in v.values()]
    kinds = list(dict.fromkeys(k for v in cases.values() for k in v))
    rows = [("checks passed", f"{sum(bool(c) for c in checks)} of {len(checks)}"),
            ("paths checked (each against eager torch or its own baseline)", ", ".join(k.replace("_", " ") for k in kinds)),
            ("model / policy cases", ", ".join(cases))]
    if "pdl" in d:
        rows.append(("programmatic dependent launch on", "yes" if d["pdl"] else "no"))
    return rows


def attention_micro(d: dict) -> list:
    rows = []
    checks = d.get("ragged_checks", [])
    if checks:
        worst = max(c["max_abs_err_vs_reference"] for c in checks)
        rows.append(("ragged batches match the torch reference",
                     f"{sum(c['ok'] for c in checks)} of {len(checks)} (max abs error {worst:.1e})"))
    cases = [c for c in d.get("cases", []) if "speedup_vs_sdpa" in c]
    for kind in dict.fromkeys(c["kind"] for c in cases):
        sel = [c for c in cases if c["kind"] == kind]
        sp = [c["speedup_vs_sdpa"] for c in sel]
        rows.append((f"{kind}: SDPA time / ours ({len(sel)} cases)", f"{min(sp):.2f}-{max(sp):.2f}x"))
    slower = [c for c in cases if c["speedup_vs_sdpa"] < 1]
    rows.append(("cases slower than SDPA", "none" if not slower else "; ".join(
        f"{shape(c['model'])} {c['batch']} x {c['chunk']} {c['kind']} {c['speedup_vs_sdpa']:.3f}x" for c in slower)))
    return rows


def step_profile(d: dict) -> list:
    return [(f"{case(c)}, batch {c['batch']}: wall / body / head / gaps / host (ms per step)",
             " / ".join(f"{c[k]:.2f}" for k in ("wall_ms_per_step", "body_ms", "head_ms", "unaccounted_ms",
                                                "host_ms_per_step")))
            for c in d.get("cases", [])]


def ab(d: dict) -> list:
    rows = []
    for r in d.get("rows", []):
        names = list(d.get("variants") or [k[: -len("_tok_s")] for k in r if k.endswith("_tok_s")])
        vals = [(n, r[f"{n}_tok_s"]) for n in names if f"{n}_tok_s" in r]
        if not vals:
            continue
        gain = vals[-1][1] / vals[0][1] - 1
        rows.append((f"{case(r)}, batch {r['batch']} (tok/s, medians)",
                     " / ".join(f"{n} {num(v)}" for n, v in vals) + f" ({gain:+.1%} last vs first)"))
    return rows


def matmul(d: dict) -> list:
    m = d.get("matmul", {})
    return [(f"{shape(m.get('shape', '?'))} forward at {m.get('tokens', 0):,} tokens (TFLOP/s)",
             f"{m['tflops']:.0f}, {pct(m['fraction_of_matmul'])} of the {m['matmul_tflops']:.0f} TFLOP/s bf16 matmul rate")]


def latency_surface(d: dict) -> list:
    fit = d.get("fit", {})
    pts = d.get("points", [])
    rows = [("model", d.get("model_id", "?")), ("fitted knee (tokens per step)", f"{fit.get('knee', 0):.0f}")]
    if pts:
        by = {}
        for p in pts:
            by.setdefault(p["tokens"], []).append(1e3 * p["seconds"])
        rows.append(("step latency, ms (tokens: fastest-slowest)", "; ".join(
            f"{t:,}: {min(v):.1f}" + (f"-{max(v):.1f}" if len(v) > 1 else "") for t, v in sorted(by.items()))))
    return rows


def skinny_micro(d: dict) -> list:
    return [(f"{c['shape']} {c['n']:,} x {c['k']:,}, {c['rows']} row: cuBLAS vs Triton (us)",
             f"{c['cublas_us']:.1f} vs {c['triton_us']:.1f}")
            for c in d.get("cases", []) if c.get("rows") == 1]


def graph_limit_ab(d: dict) -> list:
    rows = []
    for r in d.get("rows", []):
        vals = [(k[len("graph_max_"): -len("_tok_s")], v) for k, v in r.items() if k.startswith("graph_max_") and k.endswith("_tok_s")]
        rows.append((f"{r['policy']} at {r['concurrency']} requests: graphs up to {' / '.join(n for n, _ in vals)} tokens (tok/s)",
                     " / ".join(num(v) for _, v in vals)))
    return rows


def elastic_simulation(d: dict) -> list:
    thr = d.get("throughput_tok_s", {})
    loads = list(next(iter(thr.values()), {}))
    rows = []
    for name in (k for k in thr if k.startswith("elastic")):
        for n in loads:
            best = _best_fixed({p: v.get(n) for p, v in thr.items()})
            rows.append((f"{name}, {requests(n)}: vs best fixed (tok/s)", _vs_best(thr[name][n], best)))
    return rows


def train(d: dict) -> list:
    s = d.get("summary", {})
    return [("steps / seconds", f"{s.get('steps', 0):,} / {s.get('seconds', 0):.0f}"),
            ("row tokens", f"{s.get('tokens', 0) / 1e6:.1f}M"),
            ("held-out text loss (nats per masked token)", f"{s.get('heldout_text_loss', 0):.2f}"),
            ("parameters", f"{s.get('params', 0):,}")]


def finetune(d: dict) -> list:
    return [(f"stage {st['stage']}: steps / seconds / held-out text loss",
             f"{st['summary']['steps']} / {st['summary']['seconds']:.0f} / {st['summary']['heldout_text_loss']:.2f}"
             f" ({st.get('note', '')})") for st in d.get("stages", [])] + [("device", d.get("device", "?"))]


def evaluation(d: dict) -> list:
    rows = [(f"{name}: accuracy (tau)", f"{pct(c['accuracy'])} ({c['tau']['mean']:.2f})")
            for name, c in d.get("configs", {}).items()]
    if "heldout_text_loss" in d:
        rows.append(("held-out text loss (nats per masked token)", f"{d['heldout_text_loss']:.2f}"))
    return rows


def tau_profile(d: dict) -> list:
    tau = d.get("tau_per_chunk", {})
    rows = [(f"tau at chunk {' / '.join(tau)}", " / ".join(f"{float(v):.2f}" for v in tau.values()))]
    if "prompts" in d:
        source = d.get("tasks") or d.get("prompt_file", "?")
        rows.append(("prompts (tasks or prompt file)", f"{d['prompts']} ({source})"))
    return rows


def samples(d: dict) -> list:
    lat = d.get("latency_64", {})
    return [("64-token answer, median of runs (s)",
             f"{lat.get('seconds_median', 0):.3f} ({lat.get('steps', ['?'])[0]} steps, {lat.get('threads', '?')} threads)"),
            ("greedy samples", f"{len(d.get('samples', []))} ({d.get('policy', '?')})")]


# (benchmark, title, what it measures, extractor); the order is the page's order
BENCHMARKS = [
    ("offline_table", "Engine throughput at 8B shapes",
     "Output tok/s, random bf16 weights, prompt 256, generation 256 (`optimus bench offline --experiments schedule4,ar`).",
     offline_table),
    ("cache_modes", "LLaDA cache modes against Fast-dLLM",
     "LLaDA-8B shape, random bf16 weights, prompt 256, output 256, block 32, 4 tokens/step "
     "(`optimus bench offline --experiments schedule4 --cache-modes ...` and "
     "`python -m optimus.bench.experiments.fast_dllm_baseline`); Fast-dLLM's published code was measured "
     "on the same card with the same workload.", cache_modes),
    ("http_vs_engine", "Serving over HTTP against the engine in-process",
     "`benchmarks/gpu_http_bench.sh` (`optimus bench http`): the same closed loop, SDAR-8B shape, prompt 256, "
     "output 256, acceptance replayed from the default model, in-process and through `optimus serve`.",
     http_vs_engine),
    ("http_vs_engine_real8b", "Serving over HTTP against the engine in-process, real-8b acceptance regime",
     "`ACCEPTANCE=real-8b benchmarks/gpu_http_bench.sh`: as above, both sides replaying the `real-8b` regime (few "
     "commits per forward, as published 8B dLLMs); a row measured in several calls shows the call with the median "
     "ratio.", http_vs_engine),
    ("tp1_before_after", "One GPU before and after tensor parallelism",
     "Output tok/s, `optimus bench offline --experiments schedule4,ar --batches 1,8,32 --ar-shapes llama-8b`, "
     "the code before and after the tensor-parallel change back to back on one card, order swapped between calls.",
     before_after),
    ("policy_sweep_real8b", "Policies across concurrency, real-8b acceptance regime (offline)",
     "As the policy sweep, replaying the `real-8b` regime (few commits per forward, as published 8B dLLMs; "
     "`--acceptance real-8b`); one run per point and output 256 on the H200 (2026-12-04), the median of 3 and "
     "output 128 on the H100 (2026-12-06).", policy_sweep),
    ("policy_sweep_real8b_dual_cache", "Policies across concurrency on LLaDA's dual cache, real-8b regime (offline)",
     "`optimus bench offline --experiments sweep --sweep-shape llada-8b --acceptance real-8b`: LLaDA-8B shape on its "
     "default dual cache (refreshes included in every policy's time), prompt 256, output 128, block 32.",
     policy_sweep),
    ("policy_sweep_real8b_llada2", "Policies across concurrency on the LLaDA2.0-mini MoE shape, real-8b regime (offline)",
     "`benchmarks/gpu_policy_regimes.sh` with `SHAPE=llada2-mini REGIME=real-8b GRAPH_MAX_TOKENS=2048`: the "
     "mixture-of-experts shape (block-causal, prefix-block cache), random bf16 weights, prompt 256, output 128, "
     "block 32, median of 3 interleaved runs after a warm-up; elastic plans from a start-up profile with the "
     "model's expert routing.", policy_sweep),
    ("policy_sweep_tasks", "Policies across concurrency, tasks acceptance regime (offline)",
     "`benchmarks/gpu_policy_regimes.sh` with `REGIME=tasks` (`optimus bench offline --experiments sweep "
     "--acceptance tasks`): the shipped 22M model's commits on its held-out tasks replayed (12.4 per step at C = 32), "
     "SDAR-8B shape, prompt 256, output 128, median of 3 interleaved runs after a warm-up.", policy_sweep),
    ("policy_sweep_prose", "Policies across concurrency, prose acceptance regime (offline)",
     "`benchmarks/gpu_policy_regimes.sh` with `REGIME=prose`: the 22M model's commits on free prose and chat prompts "
     "replayed (about one per step at every chunk size), SDAR-8B shape, prompt 256, output 128, median of 3 "
     "interleaved runs after a warm-up.", policy_sweep),
    ("pipeline_sweep_real8b", "Pipelined half steps at high load, real-8b acceptance regime (offline)",
     "`benchmarks/gpu_pipeline_sweep.sh` (`optimus bench offline --experiments surface,sweep --policies NAME,NAME+pipeline,"
     "NAME+auto`): SDAR-8B shape, prompt 256, output 128, median of 3 runs; wall/device is a run's wall time over "
     "its steps' device time.", pipeline_sweep),
    ("moe_check", "MoE shapes: fused MoE kernel and throughput",
     "`python -m optimus.bench.experiments.moe_check`: kernel accuracy; decode expert time over 20 rotating "
     "routings per graph against the touched weights' bytes; the routed layer (router + experts) against its "
     "weight-read floor; schedule4 on llada2-mini (with each step's weight-read floor at 4.8 TB/s) and llada-8b; "
     "`--parts local`: the expert paths on mask-row routing (`local_ids`).", moe_check),
    ("moe_rows", "MoE steps: mask rows against stored rows",
     "`python -m optimus.bench.experiments.moe_rows`: the start-up profiler's synthetic steps (each request its own "
     "256-token context, a window of mask rows after its stored rows of random tokens) on random bf16 weights, "
     "graphs to 2,048 tokens; the fastest of 3 after a warm-up.", moe_rows),
    ("moe_layer_parts", "MoE layer part by part",
     "`python -m optimus.bench.experiments.moe_layer_parts`: the LLaDA2.0-mini sparse layer (random bf16 weights) "
     "in CUDA graphs on 20 rotating inputs: the fp32 gate as casts + linear or as the logits kernel, the routed "
     "experts, the shared expert, the whole layer against the bytes it must read (touched experts, shared expert, "
     "gate); the kernels at one row in the JSON.", moe_layer_parts),
    ("host_profile", "Host time per policy, profiled",
     "`python -m optimus.bench.experiments.host_profile`: the LLaDA2.0-mini real-8b sweep (64 and 256 requests, one "
     "run each) with cProfile on during each policy's timed runs; the text profiles lie beside the JSON "
     "(`latest.txt`); throughput is slowed by the profiler.", policy_sweep),
    ("sampling_throughput", "Sampled decoding against greedy",
     "`python -m optimus.bench.experiments.sampling_throughput`: random weights, every sampled request seeded "
     "(temperature 1, top-p 0.95), output tok/s.", sampling_throughput),
    ("conversion_dry_run", "SmolLM2-135M to block diffusion: a first short run",
     "`scripts/gpu/convert_smollm2.sh` at small scale: self-chat data, 150 s of LoRA training at block 8, "
     "then tokens per step and answer quality against the AR base on 64 held-out self-chat prompts.",
     conversion_dry_run),
    ("smollm2_conversion", "SmolLM2-135M to block diffusion: the shipped dLLM against its AR base",
     "`scripts/gpu/convert_smollm2.sh all`: self-chat data, a block sweep (4, 8, 16, 32) on a short budget, "
     "LoRA runs at the picked block, each scored on chat300 (`optimus eval --suite chat`, greedy, threshold 0.9); "
     "targets: accuracy within 3 points, NLL <= 1.3x, rep4 <= 1.2x, length within 20%, tau >= 2.",
     smollm2_conversion),
    ("fp8_accuracy", "FP8 weights: accuracy of the default model",
     "`optimus eval --model default --configs fixed:32 --limit 100`, with and without `--quantization fp8` "
     "(projections rounded to e4m3 per output channel, dequantized: the reference is fp32 on CPU).", fp8_accuracy),
    ("hf_generate_compare", "SmolLM2-135M shape: AR against HF `generate`",
     "Random weights at SmolLM2-135M-Instruct's config, greedy, prompt 128, output 256, end-of-text ignored "
     "(`python -m optimus.bench.experiments.hf_generate_compare`).", hf_generate_compare),
    ("policy_sweep", "Policies across concurrency (offline)",
     "Output tok/s of every chunk policy on one engine, interleaved runs, medians; acceptance replayed from the "
     "default model (`optimus bench offline --experiments surface,sweep`).", policy_sweep),
    ("serve_sweep", "Serving over HTTP (SDAR-8B shape)",
     "`optimus bench sweep` against `optimus serve --model random:sdar-8b` (`benchmarks/gpu_serve_sweep.sh`); capacity "
     "is the highest swept rate with the SLO attainment target met.", serve_sweep),
    ("serve_sweep_real8b", "Serving over HTTP to saturation, real-8b acceptance regime (SDAR-8B shape)",
     "`ACCEPTANCE=real-8b benchmarks/gpu_serve_sweep.sh`: as above, each server replaying the `real-8b` regime (few "
     "commits per forward, as published 8B dLLMs), elastic planning on the card's stored latency surface; "
     "prompt 256, output 256 (prompts per rate and rates: the last row); capacity is the highest swept rate with "
     "the SLO attainment target met.", serve_sweep),
    ("serve_sweep_emulated_h200", "The real-8b serving sweep on a CPU against an emulated H200",
     "`benchmarks/cpu_emulated_serve_sweep.sh`: the sweep above, served by `optimus serve --emulate-device`: no "
     "forward runs, each step takes the time the H200's own step traces give (its offline real-8b sweep) and elastic "
     "plans on the H200's stored surface; the engine process, the HTTP front-end, the streams and the controller "
     "are the real ones. It leaves out what the card does beyond its step times (CUDA-graph buckets, its host).",
     serve_sweep),
    ("emulated_serving_slow_host", "A serving load on an emulated H200 with a slower host",
     "`python benchmarks/slow_host_serving.py --rates 50 --rounds 3`: `emulated_serving`'s load (256 requests, "
     "prompt and output 256, `real-8b` replayed) on the H200 emulated from its step traces, elastic planning on its "
     "surface, the process sharing one CPU core with busy loops (its host work about 3x as long: the card machine's "
     "host is slower than this CPU). The H200 served elastic at 0.927 of ar at 50 req/s.", slow_host),
    ("host_time", "Host work per step at 256 requests (device left out)",
     "`optimus bench host`: SDAR-8B geometry, prompt 256, output 256, `real-8b` acceptance replayed, the forward "
     "replaced by zeros; median over the steps where all 256 requests decode. The step's wall time is host work "
     "alone; the named phases are part of it; critical = all but what runs while the device computes the step "
     "just launched (the outputs and the policy's learning; with causal overlap, the whole completion of the step "
     "before).", host_time),
    ("host_interleaved", "Host work per step against an earlier commit, step by step",
     "`python benchmarks/host_interleaved.py --base COMMIT`: `optimus bench host`'s setup (SDAR-8B geometry, prompt "
     "and output 256, `real-8b` replayed) for this tree and an earlier commit in one process, their steps in turn; "
     "each pair's critical host time compared (the same step of the same run on both), the median ratio reported. "
     "Immune to the machine's drift; the absolute times run higher than a single engine's (two share the caches).",
     host_interleaved),
    ("fp8_speed", "FP8 weights against bf16",
     "`benchmarks/gpu_fp8.sh`: the FP8 linear kernel per 8B projection shape against cuBLAS bf16, and "
     "`optimus bench offline --experiments schedule4,ar` in bf16 and with `--quantization fp8` (random weights, "
     "prompt 256, output 256).", fp8_speed),
    ("host_overlap", "Host work hidden behind an emulated device",
     "`optimus bench host --emulate-device`: SDAR-8B geometry, prompt 256, output 256, `real-8b` replayed; each step "
     "queued on an emulated device taking the synthetic 8B curve's time (11 ms flat to 256 tokens, then 40 us a "
     "token), synchronous and pipelined; over the steps where every request decodes.", host_overlap),
    ("emulated_serving", "A serving load on an emulated H200",
     "`python -m optimus.bench.experiments.emulated_serving --profile "
     "benchmarks/results/h200/latency_surface/latest.json --rates 20,50`: 256 requests (SDAR-8B geometry, prompt and "
     "output 256, `real-8b` replayed) arriving as a Poisson process, each step on an emulated device following the "
     "H200's stored surface; wide plans = plans with a window of more than one open position (such a step cannot "
     "stay in flight while the next is planned); one run each.", emulated_serving),
    ("elastic_emulated", "Elastic against every single policy on an emulated device",
     "`optimus bench host --emulate-device --pipelines off --policies ar,fixed:2,fixed:4,fixed:8,elastic "
     "--requests 16,64,128,256`: the engine (SDAR-8B geometry, prompt and output 256, `real-8b` replayed) on the "
     "synthetic 8B curve (11 ms flat to 256 tokens, then 40 us a token), whole steps (unit steps overlapped); "
     "over the steps where every request decodes; one run each.", elastic_emulated),
    ("elastic_emulated_h200_hinge", "Elastic against every single policy on an emulated H200-like hinge",
     "As `elastic_emulated`, with `--emulated-curve 0.0055,100,2.3e-5`: 5.5 ms flat to 100 tokens, then 23 us a "
     "token (the SDAR-8B shape's hinge on an H200 used by the regime tests).", elastic_emulated),
    ("latency_fit_llada2", "Step latency models at the LLaDA2.0-mini MoE shape",
     "`optimus bench latency-fit --shape llada2-mini`: the step-time surface over batch x chunk, each step predicted "
     "from the others by each latency model (tokens: straight lines in tokens and the hinge; experts: shaped by the "
     "expected experts touched); the CPU row runs a scaled body (3 layers, width 1024) with the real routing.",
     latency_fit),
    ("latency_fit_llada8b", "Step latency models at the dense LLaDA-8B shape",
     "`optimus bench latency-fit --shape llada-8b` (`benchmarks/gpu_latency_fit.sh`).", latency_fit),
    ("matmul", "Forward pass against the matmul rate", "`optimus bench offline --experiments matmul`.", matmul),
    ("step_profile_moe", "Where a decoding step goes, LLaDA2.0-mini MoE shape",
     "`python -m optimus.bench.experiments.step_profile --cases llada2-mini:ar:1:1,llada2-mini:fixed:4:4:4 "
     "--graph-max-tokens 2048`: as below, with the profiler's top kernels in the JSON.", step_profile),
    ("step_profile", "Where a decoding step goes",
     "`python -m optimus.bench.experiments.step_profile`; gaps = wall time outside the body and head (the GPU "
     "waiting for the host); host = the host's bookkeeping per step (hidden when steps overlap).", step_profile),
    ("attention_micro", "Attention kernel against SDPA (flash)",
     "`python -m optimus.bench.experiments.attention_micro`: CUDA-graph replay, cache 512, bf16.", attention_micro),
    ("skinny_micro", "Skinny-linear kernel against cuBLAS",
     "`python -m optimus.bench.experiments.skinny_micro`: bf16, L2 flushed before every call.", skinny_micro),
    ("ab_overlap", "A/B: overlapped causal steps",
     "`python -m optimus.bench.experiments.ab_kernels` (variants in one process, interleaved rounds).", ab),
    ("ab_kernels", "A/B: kernel options",
     "`python -m optimus.bench.experiments.ab_kernels` (variants in one process, interleaved rounds).", ab),
    ("graph_limit_ab", "A/B: CUDA-graph token limit",
     "`python -m optimus.bench.experiments.graph_limit_ab`.", graph_limit_ab),
    ("latency_surface", "Latency profile (what `elastic` plans with)",
     "Step latency against tokens per step, SDAR-8B shape, cache 512, CUDA graphs; the serving sweep's "
     "`--profile-path`.", latency_surface),
    ("gpu_check", "GPU correctness checks",
     "`python -m optimus.bench.experiments.gpu_check`: every fast path gives the same tokens.", gpu_check),
    ("elastic_profile_mismatch", "Elastic on a wrong latency profile (simulation)",
     "`python -m optimus.bench.experiments.elastic_profile_mismatch`: closed-loop simulation, `real-8b` replayed, "
     "the device an H200-like hinge (5.5 ms flat to 100 rows, 23 us a row past it); the controller plans on that "
     "hinge moved or scaled; the best of ar and fixed:2-16 beside it.", elastic_profile_mismatch),
    ("elastic_simulation", "Policy simulation on a measured profile",
     "`python -m optimus.bench.experiments.simulate_elastic` (CPU simulation on this card's latency profile).",
     elastic_simulation),
    ("serve_sweep_text", "Serving the default model: prose continuation",
     "`optimus bench sweep --model default --dataset text`.", serve_sweep),
    ("serve_sweep_tasks", "Serving the default model: chat tasks",
     "`optimus bench sweep --model default --dataset tasks --endpoint /v1/chat/completions`.", serve_sweep),
    ("serve_sweep_mixed", "Serving the default model: mixed prose and tasks, bursts",
     "`optimus bench sweep --model default --dataset mixed`, 48 prompts per rate.", serve_sweep),
    ("serve_sweep_mixed_sustained", "Serving the default model: mixed prose and tasks, sustained",
     "`optimus bench sweep --model default --dataset mixed`, 144 prompts per rate.", serve_sweep),
    ("eval_arith", "Default model: held-out arithmetic",
     "`optimus eval`: exact-match accuracy and tokens per step (tau) per decoding configuration.", evaluation),
    ("eval_tasks", "Default model: other held-out tasks", "`optimus eval`, as above.", evaluation),
    ("tau_profile_arith", "Default model: tau per chunk size, arithmetic", "`optimus eval --tau-profile`.", tau_profile),
    ("tau_profile_tasks", "Default model: tau per chunk size, other tasks", "`optimus eval --tau-profile`.", tau_profile),
    ("acceptance", "Default model: acceptance profile (replayed by the GPU benchmarks)",
     "`optimus bench acceptance`.", tau_profile),
    ("acceptance_prose", "Default model: acceptance on free prose and chat (the `prose` regime)",
     "`optimus bench acceptance --prompts benchmarks/prompts/acceptance_prose.jsonl`: 40 prose continuations and chat "
     "prompts, ShareGPT-like output lengths.", tau_profile),
    ("samples", "Default model: samples and CPU latency", "Greedy answers and a 64-token answer's latency.", samples),
    ("train", "Default model: training run", "`python -m optimus_lab.train fit` (base run).", train),
    ("finetune", "Default model: chunk-robust fine-tune", "`python -m optimus_lab.train fit --chunk-mix 0.8`.", finetune),
]


# ---------------------------------------------------------------- the page


def card_label(card: str) -> str:
    return card.upper()


def read_source(folder: Path) -> tuple[str, str] | None:
    f = folder / "latest.source"
    if not f.exists():
        return None
    parts = f.read_text().split()
    return (parts[0], parts[1]) if len(parts) >= 2 else None


def card_device(results: Path, card: str) -> str:
    """The card's description: the last line of <card>/gpu.txt (nvidia-smi's CSV) or <card>/device.txt,
    else the device a result file names."""
    for name in ("gpu.txt", "device.txt"):
        f = results / card / name
        lines = [ln.strip() for ln in f.read_text().splitlines() if ln.strip()] if f.exists() else []
        if lines:
            return lines[-1]
    for latest in sorted((results / card).glob("*/latest.json")):
        try:
            d = json.loads(latest.read_text())
        except ValueError:
            continue
        dev = d.get("device") or d.get("meta", {}).get("device") if isinstance(d, dict) else None
        if isinstance(dev, str):
            return dev
    return card


def collect(results: Path) -> dict:
    """{benchmark: {card: folder}} for every latest.json under results."""
    found: dict = {}
    for latest in sorted(results.glob("*/*/latest.json")):
        found.setdefault(latest.parent.name, {})[latest.parent.parent.name] = latest.parent
    return found


def render(results: Path = RESULTS, out: Path = OUT) -> str:
    found = collect(results)
    cards_present = sorted({c for v in found.values() for c in v})
    gpu_cards = list(GPU_CARDS) + sorted(c for c in cards_present if c != "cpu" and c not in GPU_CARDS)
    rel = Path(os.path.relpath(results, out.parent))

    lines = ["# Results", "",
             "<!-- Generated by scripts/results_table.py from benchmarks/results/*/*/latest.json; do not edit. -->", "",
             "The current number of every benchmark, per card. Each table has a column per card (GPU cards side by "
             "side; a card without a run reads *not measured yet*); its **source** row gives the date and commit of "
             "the measurement and links the file every number in that column comes from.", "",
             "Layout: `benchmarks/results/<card>/<benchmark>/latest.json` (plots beside it as `latest*.png`, "
             "`latest.source` = date and commit) and the runs it replaced in `history/<date>_<commit>[_<what "
             "differs>].json`. A new run is filed with `python scripts/results_table.py store CARD BENCHMARK FILE "
             "[PLOTS]`, then this page is regenerated with `python scripts/results_table.py` (a test checks that "
             "it is up to date). `docs/gpu.md`, `docs/benchmarks.md` and `docs/default_model.md` explain the "
             "numbers and the earlier runs.", "",
             "| card | device |", "| --- | --- |"]
    for card in gpu_cards + (["cpu"] if "cpu" in cards_present else []):
        lines.append(f"| {card_label(card)} | {card_device(results, card) if card in cards_present else NOT_MEASURED} |")
    lines.append("")

    known = [b[0] for b in BENCHMARKS]
    order = [b for b in BENCHMARKS if b[0] in found] + [
        (name, name.replace("_", " "), "", None) for name in sorted(found) if name not in known]
    for name, title, what, extract in order:
        have = found[name]
        gpu = any(c != "cpu" for c in have) and name not in ONE_OFF
        columns = (gpu_cards if gpu else []) + (["cpu"] if "cpu" in have else [])
        columns += [c for c in sorted(have) if c not in columns]
        per_card: dict = {}
        for card in columns:
            folder = have.get(card)
            if folder is None:
                continue
            data = json.loads((folder / "latest.json").read_text())
            try:
                per_card[card] = extract(data) if extract else [("latest.json", "present (no summary for this benchmark)")]
            except (KeyError, TypeError, ValueError, ZeroDivisionError, StopIteration) as e:
                per_card[card] = [("latest.json", f"could not be summarised ({type(e).__name__}: {e})")]
        labels = list(dict.fromkeys(label for rows in per_card.values() for label, _ in rows))
        lines += [f"## {title}", "", f"`{name}`. {what}".rstrip(), ""]
        lines.append("| | " + " | ".join(card_label(c) for c in columns) + " |")
        lines.append("| --- |" + " --- |" * len(columns))
        src = []
        for card in columns:
            folder = have.get(card)
            if folder is None:
                src.append(NOT_MEASURED)
                continue
            s = read_source(folder)
            link = (rel / card / name / "latest.json").as_posix()
            src.append(f"[{s[0]} {s[1]}]({link})" if s else f"[no latest.source]({link})")
        lines.append("| **source** | " + " | ".join(src) + " |")
        for label in labels:
            cells = []
            for card in columns:
                if card not in per_card:
                    cells.append(NOT_MEASURED)
                else:
                    cells.append(dict(per_card[card]).get(label, "—"))
            lines.append(f"| {label} | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        plots = [(card, p) for card in columns if card in have for p in sorted(have[card].glob("latest*.png"))]
        if plots:
            lines.append("")
            lines.append("Plots: " + ", ".join(
                f"[{card_label(card)} {p.stem.replace('latest_', '').replace('latest', name).replace('_', ' ')}]"
                f"({(rel / card / name / p.name).as_posix()})" for card, p in plots) + ".")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- filing a new run


def store(results: Path, card: str, benchmark: str, files: list[Path], source: str | None) -> Path:
    folder = results / card / benchmark
    folder.mkdir(parents=True, exist_ok=True)
    result = files[0]
    if result.suffix != ".json":
        raise ValueError("the first file is the result JSON")
    old = read_source(folder)
    current = sorted(p for p in folder.glob("latest*") if p.name != "latest.source")
    if current:
        if old is None:
            raise ValueError(f"{folder} has latest files but no latest.source: file them by hand")
        moves = [(p, folder / "history" / f"{old[0]}_{old[1]}{p.name[len('latest'):]}") for p in current]
        clash = [str(t) for _, t in moves if t.exists()]
        if clash:
            raise ValueError(f"history already holds {', '.join(clash)}")
        (folder / "history").mkdir(exist_ok=True)
        for p, target in moves:
            p.rename(target)
    if source is None:
        commit = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=results, capture_output=True,
                                text=True, check=True).stdout.strip()
        source = f"{datetime.date.today().isoformat()} {commit}"
    shutil.copyfile(result, folder / "latest.json")
    for f in files[1:]:
        stem = "latest" if f.stem in (result.stem, benchmark) else f"latest_{f.stem}"
        shutil.copyfile(f, folder / f"{stem}{f.suffix}")
    (folder / "latest.source").write_text(source.strip() + "\n")
    return folder


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["store"]:
        p = argparse.ArgumentParser(prog="results_table.py store")
        p.add_argument("card")
        p.add_argument("benchmark")
        p.add_argument("files", nargs="+", type=Path, help="the result JSON, then its plots or logs")
        p.add_argument("--source", default=None, help="'YYYY-MM-DD COMMIT' (default: today and the checked-out commit)")
        p.add_argument("--results", type=Path, default=RESULTS)
        a = p.parse_args(argv[1:])
        print(f"stored in {store(a.results, a.card, a.benchmark, a.files, a.source)}; now run scripts/results_table.py")
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--check", action="store_true", help="exit 1 if --out differs from what would be written")
    a = p.parse_args(argv)
    text = render(a.results, a.out)
    if a.check:
        if not a.out.exists() or a.out.read_text() != text:
            print(f"{a.out} is out of date: run python scripts/results_table.py", file=sys.stderr)
            return 1
        return 0
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
