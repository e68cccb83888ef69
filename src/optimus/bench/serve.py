"""``optimus bench serve``: drive an OpenAI-compatible server (ours, vLLM, SGLang) with timed
streamed requests and report what ``vllm bench serve`` reports, under the same JSON keys, plus
the server's dLLM counters from ``/metrics``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

import httpx
from tqdm.auto import tqdm

from optimus.bench.arrivals import arrival_times
from optimus.bench.client import RequestOptions, RequestResult, send_request
from optimus.bench.datasets import SampleRequest, add_dataset_arguments, dataset_spec_from_args, sample_requests
from optimus.bench.metrics import SLO, compute_metrics, request_latencies_ms
from optimus.bench.prometheus import counter_deltas, dllm_summary, scrape, scrape_settled


@dataclass(frozen=True)
class LoadSpec:
    request_rate: float = math.inf  # requests per second; inf sends everything at t = 0
    burstiness: float = 1.0  # gamma shape of the gaps; 1 = Poisson
    max_concurrency: int | None = None  # requests in flight at most (others wait client-side)
    seed: int = 0


@dataclass(frozen=True)
class ServeBenchConfig:
    base_url: str
    options: RequestOptions
    load: LoadSpec = field(default_factory=LoadSpec)
    slo: SLO = field(default_factory=SLO)
    percentiles: tuple[float, ...] = (99.0,)
    warmup: int = 0  # requests sent one by one before the measured run, not counted
    timeout_s: float = 600.0  # per request
    progress: bool = True


async def benchmark(cfg: ServeBenchConfig, requests: Sequence[SampleRequest],
                    count_tokens: Callable[[str], int]) -> dict:
    """Run the load once; the result dict has vLLM's keys plus ``dllm`` and ``server_counters``."""
    limits = httpx.Limits(max_connections=cfg.load.max_concurrency or max(len(requests), 1),
                          max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=cfg.base_url, timeout=httpx.Timeout(cfg.timeout_s),
                                 limits=limits) as client:
        for _ in range(cfg.warmup):
            await send_request(client, requests[0], cfg.options, count_tokens)
        before = await scrape(client)
        results, duration = await _drive(client, cfg, requests, count_tokens)
        after = await scrape_settled(client)
    result = compute_metrics(results, duration, cfg.slo, cfg.percentiles)
    result.update(_per_request_lists(results))
    deltas = counter_deltas(before, after)
    result["dllm"] = dllm_summary(deltas)
    result["server_counters"] = deltas
    return result


async def _drive(client: httpx.AsyncClient, cfg: ServeBenchConfig, requests: Sequence[SampleRequest],
                 count_tokens: Callable[[str], int]) -> tuple[list[RequestResult], float]:
    times = arrival_times(len(requests), cfg.load.request_rate, cfg.load.burstiness, cfg.load.seed)
    gate = asyncio.Semaphore(cfg.load.max_concurrency) if cfg.load.max_concurrency else contextlib.nullcontext()
    bar = tqdm(total=len(requests), disable=not cfg.progress, desc="requests")

    async def one(req: SampleRequest) -> RequestResult:
        async with gate:
            r = await send_request(client, req, cfg.options, count_tokens)
        bar.update(1)
        return r

    start = time.perf_counter()
    tasks = []
    for req, at in zip(requests, times):
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(req)))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


def _per_request_lists(results: Sequence[RequestResult]) -> dict:
    return {
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_tokens if r.success else 0 for r in results],
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "generated_texts": [r.generated_text for r in results],
        "errors": [r.error for r in results],
        "request_latencies_ms": request_latencies_ms(results),  # ours: lets a sweep re-judge other SLOs
    }


async def served_model_id(base_url: str) -> str:
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as client:
        response = await client.get("/v1/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"]


def load_tokenizer(tokenizer: str | None, model: str | None):
    """The benchmark's tokenizer: ``--tokenizer``, else ``--model`` if it is a directory, else
    the shipped default model's (which is also the tokenizer of ``random:<shape>`` models)."""
    from optimus.models.tokenizer import Tokenizer

    path = tokenizer or (model if model and Path(model).is_dir() else None)
    if path is None:
        from optimus.default_model import default_model_dir
        path = str(default_model_dir())
    return Tokenizer.from_dir(path)


def summary_lines(result: dict, cfg: ServeBenchConfig) -> list[str]:
    rows = [("Successful requests", result["completed"]), ("Failed requests", result["failed"]),
            ("Benchmark duration (s)", result["duration"]), ("Total input tokens", result["total_input_tokens"]),
            ("Total generated tokens", result["total_output_tokens"]),
            ("Request throughput (req/s)", result["request_throughput"]),
            ("Output token throughput (tok/s)", result["output_throughput"]),
            ("Total token throughput (tok/s)", result["total_token_throughput"])]
    if not cfg.slo.empty:
        rows += [("Request goodput (req/s)", result["request_goodput"]), ("SLO attainment", result["slo_attainment"])]
    for name in ("ttft", "tpot", "itl", "e2el"):
        rows += [(k.replace("_ms", " (ms)"), v) for k, v in result.items()
                 if k.endswith(f"_{name}_ms") and not k.startswith("std_")]
    rows += [(f"dLLM {k}", v) for k, v in result["dllm"].items() if not isinstance(v, dict)]
    return [f"{label:<40} {value:.2f}" if isinstance(value, float) else f"{label:<40} {value}"
            for label, value in rows]


# ---- command line --------------------------------------------------------------------
def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("load")
    g.add_argument("--endpoint", default="/v1/completions",
                   help="/v1/completions or /v1/chat/completions (default: /v1/completions)")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model if a directory, "
                                                     "else the default model's)")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps; 1 = Poisson")
    g.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    g.add_argument("--ignore-eos", action="store_true", help="ask the server to generate max_tokens always")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--percentiles", default="99", help="comma-separated percentiles to report (default: 99)")
    g.add_argument("--extra-body", default="{}", help='JSON merged into each request, e.g. \'{"policy": "ar"}\'')
    g.add_argument("--warmup", type=int, default=0, help="unmeasured requests sent first (default: 0)")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default: 600)")
    g.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root URL")
    parser.add_argument("--model", default=None, help="model id to request (default: the server's first)")
    parser.add_argument("--request-rate", type=float, default=math.inf, help="requests/s; inf = all at once")
    parser.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS",
                        help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000")
    parser.add_argument("--label", default="optimus", help="free-form label stored in the JSON")
    parser.add_argument("--out", default=None, help="write the result JSON here")
    add_dataset_arguments(parser)
    add_load_arguments(parser)


def config_from_args(args: argparse.Namespace, base_url: str, model: str, request_rate: float,
                     slo: SLO) -> ServeBenchConfig:
    options = RequestOptions(model, args.endpoint, args.ignore_eos, args.temperature, json.loads(args.extra_body))
    load = LoadSpec(request_rate, args.burstiness, args.max_concurrency, args.seed)
    percentiles = tuple(float(p) for p in args.percentiles.split(",") if p.strip())
    return ServeBenchConfig(base_url, options, load, slo, percentiles, args.warmup, args.timeout,
                            not args.disable_tqdm)


def run(args: argparse.Namespace) -> int:
    model = args.model or asyncio.run(served_model_id(args.base_url))
    cfg = config_from_args(args, args.base_url, model, args.request_rate, SLO.parse(args.goodput))
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    requests = sample_requests(dataset_spec_from_args(args), tokenizer)
    result = asyncio.run(benchmark(cfg, requests, lambda text: len(tokenizer.encode(text))))
    result = {**run_metadata(args, cfg, len(requests)), **result}
    print("\n".join(summary_lines(result, cfg)))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0 if result["completed"] else 1


def run_metadata(args: argparse.Namespace, cfg: ServeBenchConfig, num_prompts: int) -> dict:
    rate = cfg.load.request_rate
    return {"date": datetime.now().strftime("%Y%m%d-%H%M%S"),
            "endpoint_type": "openai-chat" if cfg.options.chat else "openai", "label": args.label,
            "model_id": cfg.options.model, "tokenizer_id": args.tokenizer or args.model or "default",
            "num_prompts": num_prompts, "request_rate": rate if math.isfinite(rate) else "inf",
            "burstiness": cfg.load.burstiness, "max_concurrency": cfg.load.max_concurrency,
            "dataset": args.dataset, "goodput_slo_ms": cfg.slo.as_dict()}
