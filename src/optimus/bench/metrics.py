"""Aggregate client-side request results into the summary ``vllm bench serve`` reports, under
the same JSON keys (``request_throughput``, ``mean_ttft_ms``, ``p99_itl_ms``, ...).

Definitions (per successful request): TTFT = send to first text; E2EL = send to last frame;
TPOT = (E2EL - TTFT) / (output_tokens - 1), only for outputs of 2+ tokens (0 when judging an SLO,
as vLLM does); ITL = the gaps between text frames, pooled over requests. A request is *good*
when it succeeded and meets every SLO given; ``slo_attainment`` = good / all sent (failures
count as misses), ``request_goodput`` = good / duration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from optimus.bench.client import RequestResult

SLO_METRICS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass(frozen=True)
class SLO:
    """Latency objectives in milliseconds; ``None`` = not constrained."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @classmethod
    def parse(cls, items: Sequence[str]) -> "SLO":
        """From ``["ttft:500", "tpot:50"]`` (also accepts one comma-separated string)."""
        values: dict[str, float] = {}
        for item in (p for chunk in items for p in chunk.split(",") if p.strip()):
            name, sep, ms = item.strip().partition(":")
            if not sep or name not in SLO_METRICS:
                raise ValueError(f"SLO {item!r}: expected NAME:MS with NAME in {SLO_METRICS}")
            if float(ms) <= 0:
                raise ValueError(f"SLO {item!r}: the limit must be > 0 ms")
            values[f"{name}_ms"] = float(ms)
        return cls(**values)

    @property
    def empty(self) -> bool:
        return self.ttft_ms is None and self.tpot_ms is None and self.e2el_ms is None

    def as_dict(self) -> dict[str, float]:
        return {m: v for m in SLO_METRICS if (v := getattr(self, f"{m}_ms")) is not None}

    def met(self, r: RequestResult) -> bool:
        return r.success and self.met_ms({"ttft": r.ttft * 1e3, "tpot": (tpot(r) or 0.0) * 1e3, "e2el": r.latency * 1e3})

    def met_ms(self, observed: dict[str, float]) -> bool:
        """``observed``: one successful request's latencies in ms, keyed like :data:`SLO_METRICS`."""
        return all(observed[m] <= limit for m, limit in self.as_dict().items())

    def attainment(self, latencies: dict[str, list]) -> float:
        """Share of requests within the SLOs, from :func:`request_latencies_ms` lists."""
        ok = latencies["ok"]
        good = sum(self.met_ms({m: latencies[f"{m}_ms"][i] for m in SLO_METRICS}) for i in range(len(ok)) if ok[i])
        return good / len(ok) if ok else 0.0


def tpot(r: RequestResult) -> float | None:
    if r.output_tokens < 2:
        return None
    return (r.latency - r.ttft) / (r.output_tokens - 1)


def request_latencies_ms(results: Sequence[RequestResult]) -> dict[str, list]:
    """Per request: success, TTFT, TPOT (0 below two tokens, as when judging SLOs) and E2EL in
    ms; enough to judge any other SLO later (``SLO.attainment``)."""
    return {"ok": [r.success for r in results],
            "ttft_ms": [round(r.ttft * 1e3, 3) for r in results],
            "tpot_ms": [round((tpot(r) or 0.0) * 1e3, 3) for r in results],
            "e2el_ms": [round(r.latency * 1e3, 3) for r in results]}


def compute_metrics(results: Sequence[RequestResult], duration_s: float, slo: SLO = SLO(),
                    percentiles: Sequence[float] = (99.0,)) -> dict:
    ok = [r for r in results if r.success]
    samples = {
        "ttft": [r.ttft for r in ok],
        "tpot": [t for r in ok if (t := tpot(r)) is not None],
        "itl": [g for r in ok for g in r.itl],
        "e2el": [r.latency for r in ok],
    }
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    good = sum(slo.met(r) for r in results) if not slo.empty else 0
    out = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": good / duration_s if not slo.empty else None,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
        "slo_attainment": good / len(results) if results and not slo.empty else None,
    }
    for name in LATENCY_METRICS:
        out.update(_stats_ms(name, samples[name], percentiles))
    return out


def _stats_ms(name: str, values: list[float], percentiles: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values or [0.0], dtype=np.float64) * 1000.0
    stats = {f"mean_{name}_ms": float(v.mean()), f"median_{name}_ms": float(np.median(v)),
             f"std_{name}_ms": float(v.std())}
    for p in percentiles:
        word = str(int(p)) if float(p).is_integer() else str(p)
        stats[f"p{word}_{name}_ms"] = float(np.percentile(v, p))
    return stats
