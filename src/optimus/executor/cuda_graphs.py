"""CUDA graphs for the model body, bucketed by (tokens, requests, longest request).

A step's tensors are copied into static buffers padded to the bucket: padded requests own
no rows (``cu_q`` repeats), padded rows belong to no request, are never stored (slot -1)
and are never read. The LM head runs eagerly on the gathered rows only, so the graph key
needs no logit-row count. Graphs are captured on first use, or all decode buckets at start-up
(``precapture``), and share one pool. A step carrying a prompt piece captures nothing (unless
``capture_prompt_steps``): it replays a bucket already captured or runs eagerly, so the
captures met while serving do not grow with the ways arrivals mix prompts into steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from optimus.executor.kv_storage import KVCacheStorage
from optimus.executor.runner import PagedBackend, StepBatch
from optimus.models.transformer import DecoderLM


def step_key(tokens: int, requests: int, max_q_len: int) -> tuple[int, int, int]:
    """The graph bucket of a step: (tokens, requests, longest request), each a power of two."""
    return _bucket(tokens, 8), _bucket(requests), _bucket(max_q_len)


def decode_keys(max_tokens: int, max_requests: int, max_rows_per_request: int) -> list[tuple[int, int, int]]:
    """Exactly the buckets a step of at most ``max_tokens`` rows, ``max_requests`` requests
    and ``max_rows_per_request`` rows per request can fall in, largest first. R requests whose
    longest has Q rows run between R + Q - 1 and R * Q rows."""
    keys = set()
    for r in range(1, max_requests + 1):
        for q in range(1, max_rows_per_request + 1):
            lo, hi = r + q - 1, min(r * q, max_tokens)
            t = _bucket(lo, 8)
            while lo <= hi and t <= _bucket(hi, 8):
                keys.add((t, _bucket(r), _bucket(q)))
                t *= 2
    return sorted(keys, reverse=True)


def _bucket(n: int, smallest: int = 1) -> int:
    b = smallest
    while b < n:
        b *= 2
    return b


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # [T_bucket, d], written by replay


class GraphedBody:
    def __init__(self, model: DecoderLM, storage: KVCacheStorage, attention_backend: str,
                 max_tokens: int, max_requests: int, max_pages: int, cache_only: bool = False,
                 capture_prompt_steps: bool = False) -> None:
        self.model, self.storage, self.attention_backend = model, storage, attention_backend
        self.cache_only, self.capture_prompt_steps = cache_only, capture_prompt_steps
        self.max_tokens, self.max_requests = _bucket(max_tokens, 8), _bucket(max_requests + 1)
        self.request_limit = max_requests
        dev = next(model.parameters()).device
        t, r = self.max_tokens, self.max_requests
        self.input_ids = torch.zeros(t, dtype=torch.long, device=dev)
        self.positions = torch.zeros(t, dtype=torch.long, device=dev)
        self.groups = torch.zeros(t, dtype=torch.int32, device=dev)
        self.slots = torch.full((t,), -1, dtype=torch.long, device=dev)
        self.cu_q = torch.zeros(r + 1, dtype=torch.int32, device=dev)
        self.cache_lens = torch.zeros(r, dtype=torch.int32, device=dev)
        self.page_table = torch.zeros((r, max_pages), dtype=torch.int32, device=dev)
        self.graphs: dict[tuple[int, int, int], _Graph] = {}
        self.pool = None
        self.capture_s = 0.0  # host seconds spent capturing, in total

    def fits(self, batch: StepBatch) -> bool:
        """Whether ``batch`` replays from a graph (captured first if its bucket is new)."""
        if not (batch.input_ids.numel() <= self.max_tokens and batch.cu_q.numel() - 1 < self.max_requests
                and batch.page_table.shape[1] <= self.page_table.shape[1]):
            return False
        return not batch.carries_prompt or self.capture_prompt_steps or self.key(batch) in self.graphs

    def key(self, batch: StepBatch) -> tuple[int, int, int]:
        return step_key(batch.input_ids.numel(), batch.cu_q.numel() - 1, batch.max_q_len)

    def decode_keys(self, max_rows_per_request: int) -> list[tuple[int, int, int]]:
        return decode_keys(self.max_tokens, self.request_limit, max_rows_per_request)

    def _load(self, batch: StepBatch, key: tuple[int, int, int]) -> None:
        t, r = batch.input_ids.numel(), batch.cu_q.numel() - 1
        tb, rb, _ = key
        self.input_ids[:t].copy_(batch.input_ids)
        self.input_ids[t:tb].zero_()
        self.positions[:t].copy_(batch.positions)
        self.positions[t:tb].zero_()
        self.groups[:t].copy_(batch.groups)
        self.groups[t:tb].zero_()
        self.slots[:t].copy_(batch.slots)
        self.slots[t:tb].fill_(-1)
        self.cu_q[:r + 1].copy_(batch.cu_q)
        self.cu_q[r + 1:rb + 1].fill_(t)
        self.cache_lens[:r].copy_(batch.cache_lens)
        self.cache_lens[r:rb].zero_()
        self.page_table[:r, :batch.page_table.shape[1]].copy_(batch.page_table)
        self.page_table[:r, batch.page_table.shape[1]:].zero_()

    def _static_batch(self, key: tuple[int, int, int]) -> StepBatch:
        tb, rb, qb = key
        return StepBatch(self.input_ids[:tb], self.positions[:tb], self.groups[:tb], self.slots[:tb],
                         self.cu_q[:rb + 1], self.cache_lens[:rb], self.page_table[:rb],
                         logit_rows=self.input_ids[:0], max_q_len=qb)

    def _body(self, batch: StepBatch) -> torch.Tensor:
        backend = PagedBackend(self.storage, batch, self.attention_backend, self.cache_only)
        return self.model(batch.input_ids, batch.positions, backend)

    def _capture(self, key: tuple[int, int, int]) -> _Graph:
        static = self._static_batch(key)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up kernels (Triton compiles, autotuning) outside capture
                self._body(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden = self._body(static)
        self.pool = graph.pool()
        return _Graph(graph, hidden)

    @torch.inference_mode()
    def precapture(self, keys, progress=None) -> int:
        """Capture the graphs of ``keys`` now (largest first, so the shared pool is sized by
        the first): steps that later meet them replay at once instead of stalling on a
        capture and its Triton compiles. Returns how many were captured."""
        new = [k for k in keys if k not in self.graphs]
        t0 = time.perf_counter()
        self.slots.fill_(-1)
        self.cu_q.zero_()  # all-padding metadata: no request owns a row, nothing is written
        for key in new:
            self.graphs[key] = self._capture(key)
            if progress is not None:
                progress(key)
        torch.cuda.synchronize()
        self.capture_s += time.perf_counter() - t0
        return len(new)

    @torch.inference_mode()
    def run(self, batch: StepBatch) -> torch.Tensor:
        """-> hidden [T, d] of the real rows of ``batch``."""
        key = self.key(batch)
        self._load(batch, key)
        g = self.graphs.get(key)
        if g is None:
            # Capture with all-padding metadata so warm-up writes nothing, then replay for real.
            self.precapture([key])
            self._load(batch, key)
            g = self.graphs[key]
        g.graph.replay()
        return g.hidden[:batch.input_ids.numel()]
