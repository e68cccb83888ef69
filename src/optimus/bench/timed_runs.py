"""One timed run of ``LLM.generate`` on a random-weights engine, and where it runs (``Target``):
what ``bench offline``'s experiments and its policy sweep (``bench.policy_sweep``) measure with."""

from __future__ import annotations

import gc
import random
import time
from dataclasses import dataclass

import torch

from optimus.bench.shapes import random_model
from optimus.core.params import SamplingParams
from optimus.engine.llm import LLM


@dataclass(frozen=True)
class Target:
    """Where the benchmark runs. ``tiny`` shrinks every shape (a CPU smoke run of the code)."""

    device: str = "cuda"
    tiny: bool = False
    quantization: str | None = None  # "fp8": projections kept in FP8 (models.fp8.quantize_model)
    graph_max_tokens: int | None = None  # the engines' CUDA-graph limit (None: the engine's default)
    refresh_wave_wait: int | None = None  # dual and prefix cache: steps a due refresh may wait (None: the engine's)

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
        if self.graph_max_tokens is not None:
            options.setdefault("graph_max_tokens", self.graph_max_tokens)
        if self.refresh_wave_wait is not None:
            options.setdefault("refresh_wave_wait", self.refresh_wave_wait)
        return LLM(loaded=loaded, policy=policy, commit_rule=commit_rule, device=self.device, **options)

    def free_memory(self) -> None:
        """After ``del llm``: the 8B copy must be gone before the next one is built."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def _sync(llm: LLM) -> None:
    if llm.engine.device.type == "cuda":
        torch.cuda.synchronize()


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
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
        llm.generate(random_prompts(batch if full_warmup else min(batch, 2), prompt_len, vocab, seed=1000), params)
    prompts = random_prompts(batch, prompt_len, vocab, seed=seed)
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


def median_run(runs: list[dict]) -> dict:
    """The run with the median throughput; every run's rate kept under ``output_tok_s_runs``,
    and its steps, device time, graph captures, chunk sizes and step trace under ``runs`` (in
    run order: run i of every policy replays the same draws, so runs pair across policies; a
    run far from the median is then readable step by step)."""
    row = dict(sorted(runs, key=lambda r: r["output_tok_s"])[(len(runs) - 1) // 2])
    row["output_tok_s_runs"] = [r["output_tok_s"] for r in runs]
    row["runs"] = [{"steps": r["steps"], "wall_s": round(r["wall_s"], 5),
                    "device_ms_per_step": round(r["device_ms_per_step"], 4),
                    "graph_capture_s": round(r["graph_capture_s"], 4), "chunk_sizes": r["chunk_sizes"],
                    "step_trace": r["step_trace"]} for r in runs]
    return row


def _snapshot(llm) -> dict:
    s = llm.engine.stats
    return {"steps": s.steps, "lat": s.step_latency_sum_s, "cpu": s.cpu_time_sum_s, "device": s.device_time_sum_s,
            "computed": s.tokens_computed, "committed": s.tokens_committed, "capture": s.graph_capture_s,
            "refresh_steps": s.refresh_steps, "refresh_tokens": s.refresh_tokens,
            "refresh_lat": s.refresh_step_latency_sum_s}
