"""Closed-loop streaming clients spread over processes, so that at a thousand streams the
measurement is the server's, not one Python client's event loop (parsing a thousand SSE streams
takes a core). Each process runs ``concurrency / procs`` clients over its share of the requests;
the run's duration spans the first start to the last end (wall clock, one machine)."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Sequence

import httpx

from optimus.bench.client import RequestOptions, RequestResult, send_request
from optimus.bench.datasets import SampleRequest


def default_procs(concurrency: int) -> int:
    """One client process per 128 streams, at most 8."""
    return max(1, min(8, concurrency // 128))


async def _closed_loop(url: str, options: RequestOptions, requests: Sequence[SampleRequest], concurrency: int,
                       timeout_s: float) -> tuple[list[RequestResult], float, float]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(req: SampleRequest) -> RequestResult:
            async with gate:  # a client sends its next request when its last one finished
                return await send_request(client, req, options, lambda text: 0)

        start = time.time()
        results = await asyncio.gather(*(one(r) for r in requests))
        return list(results), start, time.time()


def _share(url, options, requests, concurrency, timeout_s):
    return asyncio.run(_closed_loop(url, options, requests, concurrency, timeout_s))


class ClientPool:
    """Worker processes kept across runs (their imports are paid once, in the warm-up)."""

    def __init__(self, procs: int) -> None:
        self.procs = procs
        self._pool = ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) if procs > 1 else None

    def run(self, url: str, options: RequestOptions, requests: Sequence[SampleRequest], concurrency: int,
            timeout_s: float = 600.0) -> tuple[list[RequestResult], float]:
        """Every request answered by ``concurrency`` closed-loop clients; (results, duration)."""
        procs = min(self.procs, max(1, concurrency // 64))
        if self._pool is None or procs == 1:
            results, start, end = _share(url, options, requests, concurrency, timeout_s)
            return results, end - start
        futures = [self._pool.submit(_share, url, options, list(requests[i::procs]),
                                     concurrency // procs + (i < concurrency % procs), timeout_s)
                   for i in range(procs)]
        parts = [f.result() for f in futures]
        return [r for part in parts for r in part[0]], max(p[2] for p in parts) - min(p[1] for p in parts)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
