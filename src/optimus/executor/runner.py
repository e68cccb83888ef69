"""ModelRunner: turns a StepPlan into one forward pass over the ragged batch and returns
the logits of exactly the rows whose predictions are needed."""

from __future__ import annotations

import itertools
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import torch

from optimus.executor.kv_storage import KVCacheStorage
from optimus.executor.logit_wants import LogitWants, logit_wants
from optimus.executor.sampled_rows import SampledRows
from optimus.core.plan import StepPlan
from optimus.kernels import group_attention, request_start_rows, visible_key_end, write_kv
from optimus.models.transformer import DecoderLM


@dataclass(frozen=True)
class StepBatch:
    """Device tensors of one step. T = rows in the step, R = requests, M = logit rows."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    groups: torch.Tensor  # [T] int32, nondecreasing per request
    slots: torch.Tensor  # [T] int64, -1 = not stored
    cu_q: torch.Tensor  # [R+1] int32
    cache_lens: torch.Tensor  # [R] int32, cached positions each request's rows may read
    page_table: torch.Tensor  # [R, max_pages] int32
    logit_rows: torch.Tensor  # [M] int64 rows of the step whose logits are needed
    max_q_len: int
    carries_prompt: bool = False  # a request prefills prompt rows in this step


@dataclass(frozen=True)
class TokenFeed:
    """Input tokens that exist only on the device: the greedy picks of a step whose results
    the host has not read yet. ``sources[request_id] = (position, index)``: the token of that
    position is ``tokens[index]``."""

    tokens: torch.Tensor  # [M] int64, on the model's device
    sources: dict[str, tuple[int, int]]


class GreedyPick:
    """A step's greedy tokens: on the device at once (a :class:`TokenFeed` for the next
    step), on the host after :meth:`read`, which waits for this step's copy only."""

    def __init__(self, tokens: torch.Tensor, conf: torch.Tensor) -> None:
        self.tokens = tokens  # [M] int64 on the device
        self._ready = None
        if tokens.is_cuda:
            # Asynchronous copies into pinned memory, then one event: the host can launch
            # the next step before it waits for these.
            tokens, conf = tokens.to("cpu", non_blocking=True), conf.to("cpu", non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        self._host = (tokens, conf)

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (tokens [M] int64, softmax probabilities [M] fp32), on the CPU."""
        if self._ready is not None:
            self._ready.synchronize()
            self._ready = None
        return self._host

    def feed(self, wants: LogitWants, plan: StepPlan) -> TokenFeed:
        """The picks of single-position wants, as next-step inputs (causal decoding)."""
        sources = {plan.works[w.work_index].request.request_id: (w.positions[0], w.offset)
                   for w in wants if len(w.positions) == 1}
        return TokenFeed(self.tokens, sources)


class PageTables:
    """Builds each step's page table, [R, max pages] int64: each request's pages from the left,
    zeros after. Converting ~9,000 Python ints a step was most of its cost, so each row starts
    as a copy of the request's row of the step before and converts only the pages added since.

    Invariant (the scheduler's): a request's page list only grows, at its end, while the request
    holds it; freeing or preempting replaces it by a new list. So the previous step's row of the
    same list object holds a prefix of it. The previous step's lists stay referenced here, so
    no new list can take one of their ids.
    """

    def __init__(self) -> None:
        self._lists: list[list[int]] = []  # the previous step's page lists, row by row
        self._counts = np.zeros(0, np.int64)  # [R'] their lengths then
        self._table = np.zeros((0, 1), np.int64)  # [R', max pages'] the previous table

    def build(self, pages: list[list[int]]) -> np.ndarray:
        """-> the table (not to be written to: the next step copies rows from it)."""
        counts = np.fromiter(map(len, pages), np.int64, len(pages))
        table, had = self._previous_table(pages, max(int(counts.max(initial=0)), 1))
        grown = np.flatnonzero(counts > had)
        if grown.size:
            tails = [pages[i][h:] for i, h in zip(grown.tolist(), had[grown].tolist())]
            flat = np.fromiter(itertools.chain.from_iterable(tails), np.int64, int((counts - had)[grown].sum()))
            rows, columns = table[grown], np.arange(table.shape[1])
            # Row-major, the mask takes the tails in order: columns [had, count) of each row.
            rows[(columns >= had[grown, None]) & (columns < counts[grown, None])] = flat
            table[grown] = rows
        self._lists, self._counts, self._table = pages, counts, table
        return table

    def _previous_table(self, pages: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
        """(a new table [n, width] holding each list's row of the previous table, zeros for a
        list it did not have; [n] int64 the leading pages of each list it holds so)."""
        old, table = self._table, np.zeros((len(pages), width), np.int64)
        common = min(width, old.shape[1])  # the previous rows hold zeros past it
        if len(self._lists) == len(pages) and all(map(operator.is_, self._lists, pages)):
            table[:, :common] = old[:, :common]  # the usual step: the same requests in the same order
            return table, self._counts
        row_of = dict(zip(map(id, self._lists), range(len(self._lists))))
        prev = np.fromiter(map(row_of.get, map(id, pages), itertools.repeat(-1)), np.int64, len(pages))
        kept = np.flatnonzero(prev >= 0)
        had = np.zeros(len(pages), np.int64)
        had[kept] = self._counts[prev[kept]]
        table[kept, :common] = old[prev[kept], :common]
        return table, had


_REQUEST_ID = operator.attrgetter("request_id")


def _window_flags(requests, lo: np.ndarray, width: np.ndarray, base: np.ndarray | None, canvases) -> np.ndarray:
    """The masked flags of every window's positions, laid end to end [sum(width)] bool: one
    indexed read of the shared canvases where every request lives there (``base``: each
    request's span start), else a slice per request."""
    if base is None:
        spans = zip(requests, lo.tolist(), (lo + width).tolist())
        return ~np.concatenate([r.committed[a:b] for r, a, b in spans] or [np.zeros(0, bool)])
    starts = np.repeat(base + lo - (np.cumsum(width) - width), width)
    return ~canvases.committed[starts + np.arange(starts.size)]


def _stored_slots(table: np.ndarray, row_req: np.ndarray, pos: np.ndarray, stored: np.ndarray,
                  page_size: int) -> np.ndarray:
    """Every row's cache slot [rows] int64, -1 where the row is not ``stored``: only the stored
    rows look their page up in ``table`` (a decode step stores a few of its thousands of rows).
    ``row_req``/``pos`` [rows]: each row's request (table row) and position."""
    slots = np.full(pos.size, -1, np.int64)
    rows = np.flatnonzero(stored)
    if rows.size:
        at = pos[rows]
        page = table[row_req[rows], np.minimum(at // page_size, table.shape[1] - 1)]
        slots[rows] = page * page_size + at % page_size
    return slots


def _row_groups(works, cu: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """Every row's attention group [rows] int32: the works' own lists where they have one,
    else 0 for stored rows and 1 for the rest (RequestWork.row_groups), vectorised."""
    explicit = [i for i, w in enumerate(works) if w.groups is not None]
    if len(explicit) == len(works):
        return np.fromiter(itertools.chain.from_iterable(w.groups for w in works), np.int32, int(cu[-1]))
    groups = (~stored).astype(np.int32)
    for i in explicit:
        groups[cu[i]:cu[i + 1]] = works[i].groups
    return groups


def _fed_rows(requests, starts: np.ndarray, ends: np.ndarray, windowed: np.ndarray, cu: np.ndarray,
              feed: TokenFeed) -> tuple[np.ndarray, np.ndarray] | tuple[()]:
    """(step rows, feed indices) of the works with a window that run the position whose token
    is in ``feed``, () if none. Usually their first row; not when the step before could not
    store its row (its pages were short): this step recomputes that row first, and the fed
    position is the one after it."""
    found = map(feed.sources.get, map(_REQUEST_ID, requests))
    hits = [(i, *source) for i, source in enumerate(found) if source is not None]
    if not hits:
        return ()
    i, position, index = np.fromiter(itertools.chain.from_iterable(hits), np.int64, 3 * len(hits)).reshape(-1, 3).T
    ran = windowed[i] & (starts[i] <= position) & (position < ends[i])
    if not ran.any():
        return ()
    i, position = i[ran], position[ran]
    return cu[i] + position - starts[i], index[ran]


class PagedBackend:
    """The engine's AttentionBackend. Default: attend over cache + groups, then store the
    step's K/V. ``cache_only`` (dual cache): store first, then attend over the cache alone, so
    the step's rows replace their own slots and every row reads the whole cached canvas."""

    def __init__(self, storage: KVCacheStorage, batch: StepBatch, attention_backend: str,
                 cache_only: bool = False) -> None:
        self.storage, self.batch, self.attention_backend = storage, batch, attention_backend
        self.cache_only = cache_only
        self.live_rows = batch.cu_q[-1:]  # the requests' rows end here; a graph's padding follows
        self._key_end: torch.Tensor | None = None  # per-step metadata shared by every layer

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b = self.batch
        if self._key_end is None and q.is_cuda:
            self._key_end = (request_start_rows(b.cu_q, b.groups.numel()) if self.cache_only
                             else visible_key_end(b.cu_q, b.groups))
        k_cache, v_cache = self.storage.keys[layer], self.storage.values[layer]
        if self.cache_only:
            write_kv(k, v, k_cache, v_cache, b.slots)
        out = group_attention(q, k, v, k_cache, v_cache, b.page_table, b.cache_lens, b.cu_q, b.groups,
                              backend=self.attention_backend, max_q_len=b.max_q_len, key_end=self._key_end,
                              cache_only=self.cache_only)
        if not self.cache_only:
            write_kv(k, v, k_cache, v_cache, b.slots)  # after attention: cache_lens exclude these rows
        return out


class HostStaging:
    """Uploads a step's host arrays with one host-to-device copy per dtype.

    Eight small pageable copies cost a blocking round trip each; packing them into one
    reused pinned buffer makes the upload a single asynchronous copy. Before a buffer is
    rewritten, the host waits for the event recorded after its previous copy (a step
    without logits never synchronises on its own).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pin = device.type == "cuda"
        self._buffers: dict[np.dtype, torch.Tensor] = {}
        self._copied: dict[np.dtype, torch.cuda.Event] = {}

    def upload(self, arrays, dtype) -> list[torch.Tensor]:
        """-> one device tensor per array (same shapes), views of one packed upload."""
        arrays = [np.asarray(a) for a in arrays]
        # Each array starts on a 16-element boundary: kernels (Triton specialises on 16-byte
        # alignment) see the same pointer alignment as for separately allocated tensors.
        starts = list(itertools.accumulate((-(-a.size // 16) * 16 for a in arrays), initial=0))
        total = max(starts[-1], 1)
        key = np.dtype(dtype)
        if key in self._copied:
            self._copied[key].synchronize()
        buf = self._buffer(key, total)
        host = buf.numpy()
        for a, lo in zip(arrays, starts):
            host[lo:lo + a.size] = a.reshape(-1)
        packed = buf[:total].to(self.device, non_blocking=self.pin)
        if self.pin:
            self._copied.setdefault(key, torch.cuda.Event()).record()
        else:
            packed = packed.clone()  # the CPU "upload" must not alias the reused buffer
        views = [packed[lo:lo + a.size] for a, lo in zip(arrays, starts)]
        return [v if a.ndim == 1 else v.view(a.shape) for v, a in zip(views, arrays)]

    def _buffer(self, dtype: np.dtype, size: int) -> torch.Tensor:
        buf = self._buffers.get(dtype)
        if buf is None or buf.numel() < size:
            tdtype = torch.from_numpy(np.zeros(0, dtype)).dtype
            buf = torch.empty(max(size, 2 * (buf.numel() if buf is not None else 0), 4096), dtype=tdtype,
                              pin_memory=self.pin)
            self._buffers[dtype] = buf
        return buf


class ModelRunner:
    def __init__(self, model: DecoderLM, storage: KVCacheStorage, page_size: int,
                 device: torch.device, attention_backend: str = "auto", graphs=None,
                 cache_only: bool = False) -> None:
        self.model, self.storage, self.page_size = model, storage, page_size
        self.device, self.attention_backend = device, attention_backend
        self.cache_only = cache_only  # the cache scheme's attention (see PagedBackend)
        self.graphs = graphs  # optional GraphedBody (CUDA only)
        self.last_build_s = 0.0  # host time spent building the latest batch
        self.staging = HostStaging(device)
        self.page_tables = PageTables()

    def build(self, plan: StepPlan, feed: TokenFeed | None = None) -> tuple[StepBatch, LogitWants]:
        """Vectorised over rows and requests: per request, a few slices.
        A work whose first row is a position in ``feed`` reads that row's token from it."""
        works, ps = plan.works, self.page_size
        n = len(works)
        requests = plan.requests()
        columns = plan.columns()
        starts, ends, store_ends, visible, shift = (columns.start, columns.end, columns.store_end,
                                                    columns.cached_keys, columns.shift)
        lens = ends - starts
        cu = np.zeros(n + 1, np.int64)
        np.cumsum(lens, out=cu[1:])
        row_req = np.repeat(np.arange(n), lens)
        pos = (starts - cu[:-1])[row_req] + np.arange(cu[-1])
        stored = pos < store_ends[row_req]
        table = self.page_tables.build([r.pages for r in requests])
        slots = _stored_slots(table, row_req, pos, stored, ps)
        canvases = plan.canvases
        held = plan.slots()  # their canvas columns
        base = canvases.base[held] if held is not None else None
        if base is None:
            ids = np.concatenate([w.request.tokens[w.start:w.end] for w in works])
        else:  # one read over every request's span
            ids = canvases.tokens[base[row_req] + pos]
        groups = _row_groups(works, cu, stored)
        carries_prompt = not columns.windowed.all() and plan.carries_prompt  # a prompt piece has no window
        lo, hi = columns.lo, columns.hi  # (0, 0) for a work without a window
        open_ = _window_flags(requests, lo, hi - lo, base, canvases)
        wants, logit_rows = logit_wants(open_, lo, hi - lo, cu[:-1] - starts - shift)
        fed = _fed_rows(requests, starts, ends, hi > lo, cu, feed) if feed is not None else ()
        ids_d, pos_d, slots_d, logit_d, *fed_d = self.staging.upload((ids, pos, slots, logit_rows, *fed), np.int64)
        if fed:
            ids_d[fed_d[0]] = feed.tokens[fed_d[1]]
        groups_d, cu_d, lens_d, table_d = self.staging.upload((groups, cu, visible, table), np.int32)
        batch = StepBatch(input_ids=ids_d, positions=pos_d, groups=groups_d, slots=slots_d, cu_q=cu_d,
                          cache_lens=lens_d, page_table=table_d, logit_rows=logit_d,
                          max_q_len=int(lens.max()) if n else 1, carries_prompt=carries_prompt)
        return batch, wants

    @property
    def capture_s(self) -> float:
        """Host seconds spent capturing CUDA graphs so far (a one-time cost per bucket)."""
        return self.graphs.capture_s if self.graphs is not None else 0.0

    def forward(self, batch: StepBatch) -> torch.Tensor:
        if self.graphs is not None and self.graphs.fits(batch):
            return self.graphs.run(batch)
        backend = PagedBackend(self.storage, batch, self.attention_backend, self.cache_only)
        return self.model(batch.input_ids, batch.positions, backend)

    @torch.inference_mode()
    def run(self, plan: StepPlan, feed: TokenFeed | None = None,
            on_built: Callable[[], None] | None = None) -> tuple[torch.Tensor, LogitWants]:
        """-> (final hidden states [M, d] of the rows whose logits are needed, what each serves).
        ``on_built`` runs between the batch build and the forward (a device timer's start)."""
        t0 = time.perf_counter()
        batch, wants = self.build(plan, feed)
        self.last_build_s = time.perf_counter() - t0
        if on_built is not None:
            on_built()
        hidden = self.forward(batch)
        return hidden[batch.logit_rows], wants

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden).float()

    def sampled_logits(self, hidden: torch.Tensor) -> torch.Tensor | SampledRows:
        """The logits a sampled draw (``sampled_rows.propose``) reads: hidden [M, d] -> [M, vocab];
        on a tensor-parallel model, rows that are never gathered (drawn on the vocabulary slices)."""
        if getattr(self.model, "parallel", None) is None:
            return self.logits(hidden)
        return SampledRows(self.model, hidden)

    @torch.inference_mode()
    def greedy(self, hidden: torch.Tensor, rows_per_pass: int = 1024) -> GreedyPick:
        """hidden [M, d] -> the argmax tokens [M] and their softmax probabilities [M].

        The LM head runs in slices so the [M, vocab] fp32 logits never exist all at once.
        """
        if hidden.shape[0] == 0:
            return GreedyPick(torch.zeros(0, dtype=torch.long, device=hidden.device),
                              torch.zeros(0, device=hidden.device))
        picks = [self.model.greedy(h) for h in hidden.split(rows_per_pass)]
        if len(picks) == 1:
            return GreedyPick(*picks[0])
        return GreedyPick(torch.cat([t for t, _ in picks]), torch.cat([c for _, c in picks]))
