"""The in-process side of ``optimus bench http``: a closed loop straight on the engine.

``concurrency`` clients each keep one request in flight: when one finishes, the next prompt
goes in before the next step (as a streaming client's new request would). The engine
detokenizes every output as a server does (``stream_text``), so the only difference from the
HTTP run of the same load is the server around the engine. Times are per request, as the
HTTP client measures them: TTFT = added to the first output with tokens, TPOT = the rest of
the answer over its remaining tokens."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from optimus.core.params import SamplingParams


@dataclass
class _Live:
    added: float
    first: float | None = None


def run_closed_loop(engine, prompts: Sequence[Sequence[int]], params: SamplingParams, concurrency: int) -> dict:
    """Serve every prompt with at most ``concurrency`` in flight; throughput and latencies."""
    engine.post.stream_text = True
    engine.post.final_text = True
    pending = list(enumerate(prompts))[::-1]
    live: dict[str, _Live] = {}
    ttfts, tpots, tokens = [], [], 0
    s0 = (engine.stats.steps, engine.stats.step_latency_sum_s, engine.stats.graph_capture_s)
    start = time.perf_counter()

    def admit() -> None:
        while pending and len(live) < concurrency:
            i, ids = pending.pop()
            rid = f"loop-{i}-{time.monotonic_ns()}"
            engine.add_request(rid, list(ids), params)
            live[rid] = _Live(time.perf_counter())

    admit()
    while live:
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            state = live.get(out.request_id)
            if state is None:
                continue
            if state.first is None and out.token_ids:
                state.first = now
                ttfts.append(now - state.added)
            if out.finished:
                del live[out.request_id]
                n = len(out.token_ids)
                tokens += n
                if n > 1 and state.first is not None:
                    tpots.append((now - state.first) / (n - 1))
        admit()
        if live and not engine.has_work():
            raise RuntimeError("engine went idle with requests unfinished")
    wall = time.perf_counter() - start
    steps = engine.stats.steps - s0[0]
    return {"requests": len(prompts), "output_tokens": tokens, "wall_s": wall, "output_tok_s": tokens / wall,
            "steps": steps, "mean_step_ms": 1e3 * (engine.stats.step_latency_sum_s - s0[1]) / max(steps, 1),
            "graph_capture_s": engine.stats.graph_capture_s - s0[2],
            **percentiles_ms("ttft", ttfts), **percentiles_ms("tpot", tpots)}


def percentiles_ms(name: str, seconds: Sequence[float]) -> dict[str, float]:
    v = np.asarray(list(seconds) or [0.0], dtype=np.float64) * 1e3
    return {f"p50_{name}_ms": float(np.percentile(v, 50)), f"p99_{name}_ms": float(np.percentile(v, 99))}
