"""Where a decoding step's time goes, on the GPU (run on the device machine):

    PYTHONPATH=src python -m optimus.bench.experiments.step_profile --out step_profile.json

For each case (default: AR Llama-8B shape at batch 1 and 32, the LLaDA-8B 4-tokens-per-step
schedule at batch 1; ``--cases SHAPE:POLICY:BATCH:TOKENS_PER_STEP,...`` others, such as
``llada2-mini:ar:1:1``) it times, per step: the wall clock, the model body (CUDA events around
``ModelRunner.forward``), the LM head + argmax + copy back (``ModelRunner.greedy``), and the
host's share (wall minus the two GPU phases, which the host waits for). A torch-profiler pass
then lists the kernels by total GPU time. Random bf16 weights, prompt 256.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from optimus.bench.timed_runs import Target, random_prompts
from optimus.core.params import SamplingParams

CASES = (("llama-8b", "ar", 1, 1), ("llama-8b", "ar", 32, 1), ("llada-8b", "fixed:32", 1, 4))


class PhaseTimer:
    """Wraps two runner methods with CUDA events; ``ms()`` -> mean GPU ms per call of each."""

    def __init__(self, runner) -> None:
        self.events: dict[str, list] = {"body": [], "head": []}
        for name, attr in (("body", "forward"), ("head", "greedy")):
            setattr(runner, attr, self._wrap(getattr(runner, attr), self.events[name]))

    @staticmethod
    def _wrap(fn, sink):
        def timed(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            sink.append((start, end))
            return out
        return timed

    def reset(self) -> None:
        for sink in self.events.values():
            sink.clear()

    def ms(self) -> dict[str, float]:
        torch.cuda.synchronize()
        return {k: sum(s.elapsed_time(e) for s, e in v) / max(len(v), 1) for k, v in self.events.items()}


def parse_cases(text: str) -> tuple[tuple[str, str, int, int], ...]:
    """``SHAPE:POLICY:BATCH:TOKENS_PER_STEP,...`` -> the cases, as CASES holds them."""
    cases = []
    for item in text.split(","):
        shape, rest = item.split(":", 1)
        policy, batch, tokens = rest.rsplit(":", 2)  # a policy may hold a colon (fixed:4)
        cases.append((shape, policy, int(batch), int(tokens)))
    return tuple(cases)


def profile_case(target: Target, shape: str, policy: str, batch: int, tokens_per_step: int, gen: int,
                 **options) -> dict:
    """``options``: the engine's (``cuda_graphs=False``: every kernel launched on its own, so the
    profiler's list names each one)."""
    llm = target.llm(shape, policy, max_running=max(batch, 2), block_size=32, **options)
    params = SamplingParams(max_tokens=gen, rule="topk", tokens_per_step=tokens_per_step, ignore_eos=True)
    vocab = llm.engine.spec.arch.vocab_size
    llm.generate(random_prompts(batch, 256, vocab, seed=1), params)  # compile, capture graphs
    timer = PhaseTimer(llm.engine.runner)
    timer.reset()
    steps0, cpu0 = llm.engine.stats.steps, llm.engine.stats.cpu_time_sum_s
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(random_prompts(batch, 256, vocab), params)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    steps = llm.engine.stats.steps - steps0
    phases = timer.ms()
    step_ms = 1e3 * wall / steps
    row = {"shape": shape, "policy": policy, "batch": batch, "tokens_per_step": tokens_per_step,
           "output_tok_s": sum(len(o.token_ids) for o in outs) / wall, "steps": steps,
           "wall_ms_per_step": step_ms, "body_ms": phases["body"], "head_ms": phases["head"],
           "host_ms_per_step": 1e3 * (llm.engine.stats.cpu_time_sum_s - cpu0) / steps,
           "unaccounted_ms": step_ms - phases["body"] - phases["head"]}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(random_prompts(batch, 256, vocab, seed=2), SamplingParams(
            max_tokens=min(gen, 64), rule="topk", tokens_per_step=tokens_per_step, ignore_eos=True))
    kernels = sorted(((e.key, e.device_time_total / 1e3, e.count) for e in prof.key_averages()
                      if e.device_time_total > 0), key=lambda k: -k[1])[:15]
    row["top_kernels_ms"] = [{"name": k[:80], "total_ms": round(t, 3), "calls": c} for k, t, c in kernels]
    print(f"{shape} {policy} batch={batch}: {row['output_tok_s']:.0f} tok/s, step {step_ms:.2f} ms = "
          f"body {phases['body']:.2f} + head {phases['head']:.2f} + rest {row['unaccounted_ms']:.2f} "
          f"(host bookkeeping {row['host_ms_per_step']:.2f})", flush=True)
    for k in row["top_kernels_ms"][:8]:
        print(f"    {k['total_ms']:8.2f} ms {k['calls']:6d}x  {k['name']}")
    del llm
    target.free_memory()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--gen", type=int, default=128, help="generated tokens per request in the timed run")
    p.add_argument("--cases", default=None, help="SHAPE:POLICY:BATCH:TOKENS_PER_STEP,... (default: the three above)")
    p.add_argument("--graph-max-tokens", type=int, default=None, help="CUDA-graph token limit (MoE shapes)")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs (the timings then include launch gaps)")
    args = p.parse_args()
    target = Target(graph_max_tokens=args.graph_max_tokens)
    cases = parse_cases(args.cases) if args.cases else CASES
    options = {"cuda_graphs": False} if args.eager else {}
    rows = [profile_case(target, *case, gen=args.gen, **options) for case in cases]
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": rows}, f, indent=2)


if __name__ == "__main__":
    main()
