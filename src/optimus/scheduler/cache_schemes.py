"""Cache schemes: which rows of a decoding request run in a step, which are stored, and what
cached keys they read.

- ``prefix-block`` (every model; the only scheme for causal and block-causal models, whose
  caches are exact): the prompt is prefilled once; a step runs the finished window's rows
  (stored now, with their final tokens) and the active window; each block sees the prompt,
  earlier blocks and itself. For full-attention models (LLaDA, Dream) this approximates:
  they were trained to see the whole masked canvas ahead.
- ``prefix-cache`` (Fast-dLLM): at each block start one forward over prompt + the whole
  canvas, storing the K/V before the block; each later step of the block recomputes the
  block and everything after it against that prefix. The window is always the whole block.
- ``dual-cache`` (Fast-dLLM, the default for full-attention models): the block-start
  forward stores the K/V of the whole sequence; a step recomputes only its window's rows,
  writes them over their slots and reads every key from the cache. With a chunk C < block
  the keys of the block's other positions come from the last forward that computed them
  (the refresh, or the step that stored an earlier chunk with its final tokens).

A block-start forward ("refresh") is the step's first work for the request: its rows count
against the step's token budget before chunk sizes are chosen, like stored windows do.
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from optimus.core.plan import RequestWork, WorkColumns
from optimus.core.request import Request, RequestState
from optimus.models.spec import AttentionKind

SCHEMES = ("auto", "dual-cache", "prefix-cache", "prefix-block")

_SLOT, _REQUEST, _START = operator.attrgetter("slot"), operator.attrgetter("request"), operator.attrgetter("start")

# (request, tokens of KV it must hold, may preempt others) -> whether its pages now cover them
EnsurePages = Callable[[Request, int, bool], bool]


class CacheScheme(Protocol):
    name: str
    cache_only: bool  # the runner writes a step's rows first and attends to the cache alone
    prefills: bool  # prompts are prefilled (False: the block-start refresh computes them)
    chooses_chunks: bool  # the chunk policy sizes windows (False: whole blocks)

    def lead_rows(self, r: Request) -> int:
        """Rows a refresh would add before r's window this step (0: none due)."""
        ...

    def refresh_rows(self, r: Request) -> int:
        """Rows each of r's block-start refreshes recomputes (0: the scheme never refreshes)."""
        ...

    def lead_work(self, r: Request, ensure: EnsurePages) -> RequestWork | None:
        """The rows r must run before its window this step (a stored window, a refresh),
        with their pages reserved (may preempt); None if there are none or pages are short."""
        ...

    # A scheme that ``prefills`` has stores as its only leads, and plans them at once:
    # ``store_leads(requests, ensure, page_tokens) -> {request id: lead}`` (PrefixBlock).

    def decode_work(self, r: Request, lead: RequestWork | None, window: tuple[int, int],
                    ensure: EnsurePages) -> RequestWork:
        """r's rows this step for ``window`` (``Request.plan_window`` at the chunk chosen; the
        whole block where the scheme does not choose chunks), after ``lead``."""
        ...

    def decode_works(self, requests: list[Request], leads: dict[str, RequestWork],
                     windows: list[tuple[int, int]], ensure: EnsurePages) -> list[RequestWork]:
        """:meth:`decode_work` of each request for its window, after its lead (``leads`` by
        request id): a step's decoders at once."""
        ...

    def admit_tokens(self, r: Request, target: int) -> int:
        """KV tokens r must be able to hold to be admitted (``target``: rows to prefill)."""
        ...

    def preempted(self, r: Request) -> int:
        """Reset r's cache state after its pages were freed; -> rows to recompute."""
        ...


def _each_decode_work(scheme: CacheScheme, requests: list[Request], leads: dict[str, RequestWork],
                      windows: list[tuple[int, int]], ensure: EnsurePages) -> list[RequestWork]:
    """``decode_works`` as one ``decode_work`` call per request."""
    return [scheme.decode_work(r, leads.get(r.request_id), w, ensure) for r, w in zip(requests, windows)]


def _store(r: Request, ensure: EnsurePages) -> RequestWork | None:
    """The finished window's rows with their final tokens, stored now (group 0)."""
    a, b = r.pending_store
    if not ensure(r, b, True):
        return None
    return _stored(r, a, b)


def _stored(r: Request, a: int, b: int) -> RequestWork:
    """r's store of rows [a, b), its pages reserved. The stored rows count as cached from here
    on, so the next window (and the policy's view of it) starts after them."""
    r.cache_len, r.pending_store = b, None
    r.stored_ends.append(b)
    return RequestWork(r, a, b, b, None, None)  # groups None: every row group 0


@dataclass(frozen=True)
class PrefixBlock:
    attention: AttentionKind
    suffix_window: int = 0  # full attention: mask positions after the chunk, computed, not stored
    name: str = "prefix-block"
    cache_only: bool = False
    prefills: bool = True
    chooses_chunks: bool = True

    def lead_rows(self, r: Request) -> int:
        return 0

    def refresh_rows(self, r: Request) -> int:
        return 0

    def lead_work(self, r: Request, ensure: EnsurePages) -> RequestWork | None:
        return _store(r, ensure) if r.pending_store is not None else None

    def store_leads(self, requests: list[Request], ensure: EnsurePages, page_tokens: int) -> dict[str, RequestWork]:
        """:meth:`lead_work` of each of ``requests`` (each with a pending store) that still
        decodes when its turn comes (an earlier one's store may preempt it), by request id; one
        whose pages are short is left out. Pages that already hold the store (``page_tokens``
        a page) are not asked for: most stores stay in the pages their request holds."""
        out = {}
        for r in requests:
            if r.state is not RequestState.DECODING:
                continue
            a, b = r.pending_store
            if len(r.pages) * page_tokens >= b or ensure(r, b, True):
                out[r.request_id] = _stored(r, a, b)
        return out

    def decode_work(self, r: Request, lead: RequestWork | None, window: tuple[int, int],
                    ensure: EnsurePages) -> RequestWork:
        start = lead.start if lead is not None else r.cache_len
        rows_hi = window[1] - r.geometry.shift  # rows [cache_len, rows_hi) predict the window (rows_for)
        attention = self.attention
        if attention is AttentionKind.FULL and self.suffix_window:
            rows_hi = min(rows_hi + self.suffix_window, r.geometry.canvas_end)
        groups, store_end = None, r.cache_len  # the stored rows group 0, the window's rows group 1
        if attention is AttentionKind.CAUSAL and ensure(r, rows_hi, False):
            store_end = rows_hi  # causal rows are final as soon as they are computed
            groups = list(range(start, rows_hi))
        return RequestWork(r, start, rows_hi, store_end, groups, window)

    @property
    def _plain_decode(self) -> bool:
        """Non-causal without suffix rows: a decode work is the window's rows after the lead,
        nothing stored."""
        attention = self.attention
        return not (attention is AttentionKind.CAUSAL or (attention is AttentionKind.FULL and self.suffix_window))

    def decode_works(self, requests: list[Request], leads: dict[str, RequestWork],
                     windows: list[tuple[int, int]], ensure: EnsurePages) -> list[RequestWork]:
        """Plain decode works (:attr:`_plain_decode`) are built inline, not by a call per
        request (a step at 256 requests builds 256)."""
        if not self._plain_decode:
            return _each_decode_work(self, requests, leads, windows, ensure)
        get = leads.get
        return [RequestWork(r, lead.start if (lead := get(r.request_id)) is not None else r.cache_len,
                            hi - r.geometry.shift, r.cache_len, None, (lo, hi))
                for r, (lo, hi) in zip(requests, windows)]

    def decode_columns(self, requests: list[Request], leads: dict[str, RequestWork], slots: np.ndarray,
                       cache_len: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                       shift: np.ndarray) -> tuple[list[RequestWork], WorkColumns] | None:
        """:meth:`decode_works` for the windows [lo, hi) from arrays [n] (the requests' canvas
        slots, cursors and shifts), with the works' columns; None unless the works are plain
        and every lead's request is among ``requests``."""
        if not self._plain_decode:
            return None
        start = cache_len
        if leads:  # a lead's rows come first: the work starts where the lead does
            index_of = np.full(int(slots.max()) + 1, -1, np.int64)
            index_of[slots] = np.arange(slots.size)
            lead_slots = np.fromiter(map(_SLOT, map(_REQUEST, leads.values())), np.int64, len(leads))
            at = index_of[np.minimum(lead_slots, index_of.size - 1)]
            if (at < 0).any() or not np.array_equal(slots[at], lead_slots):
                return None
            start = cache_len.copy()
            start[at] = np.fromiter(map(_START, leads.values()), np.int64, len(leads))
        end = hi - shift
        works = list(map(RequestWork, requests, start.tolist(), end.tolist(), cache_len.tolist(),
                         itertools.repeat(None), zip(lo.tolist(), hi.tolist())))
        return works, WorkColumns(start, end, cache_len, cache_len, start, shift, lo, hi, np.ones(lo.size, bool),
                                  np.zeros(lo.size, bool))

    def admit_tokens(self, r: Request, target: int) -> int:
        # The whole prompt plus one block: never admit a request that would force a preemption.
        return target + r.geometry.block_size

    def preempted(self, r: Request) -> int:
        target = max(r.cache_len, r.geometry.prefill_len)
        if r.pending_store is not None:  # its commit group is recomputed as the segment it would have been
            target, r.pending_store = r.pending_store[1], None
            r.stored_ends.append(target)
        r.cache_len = 0
        return target


class _Refreshing:
    """Shared by the Fast-dLLM schemes: no prefill; a whole-sequence forward at each block start."""

    prefills = False

    def decode_works(self, requests: list[Request], leads: dict[str, RequestWork],
                     windows: list[tuple[int, int]], ensure: EnsurePages) -> list[RequestWork]:
        return _each_decode_work(self, requests, leads, windows, ensure)

    def _refresh_due(self, r: Request) -> bool:
        """Whether r's next window (after any pending store) opens a block not yet refreshed."""
        g = r.geometry
        cursor = r.pending_store[1] if r.pending_store is not None else r.cache_len
        return r.refreshed_block != g.block_end(max(cursor + g.shift, g.canvas_start))

    def lead_rows(self, r: Request) -> int:
        return self.refresh_rows(r) if self._refresh_due(r) else 0

    def refresh_rows(self, r: Request) -> int:
        return r.geometry.canvas_end

    def admit_tokens(self, r: Request, target: int) -> int:
        return r.geometry.canvas_end

    def preempted(self, r: Request) -> int:
        # The cursor survives (the next refresh recomputes every row); nothing to prefill.
        if r.pending_store is not None:
            r.cache_len, r.pending_store = r.pending_store[1], None
        r.refreshed_block = None
        return 0

    def _refresh(self, r: Request, ensure: EnsurePages, store_to) -> RequestWork | None:
        if r.pending_store is not None:  # a finished block: the refresh recomputes its rows
            r.cache_len, r.pending_store = r.pending_store[1], None
        # Rows before the window are final from here on (the prompt, on a first refresh).
        r.cache_len = r.window_start() - r.geometry.shift
        if not ensure(r, store_to(r), True):
            return None
        r.refreshed_block = r.geometry.block_end(r.window_start())
        n = r.geometry.canvas_end
        return RequestWork(r, 0, n, store_to(r), [1] * n, None, refresh=True)


@dataclass(frozen=True)
class PrefixCache(_Refreshing):
    name: str = "prefix-cache"
    cache_only: bool = False
    chooses_chunks: bool = False

    def lead_work(self, r: Request, ensure: EnsurePages) -> RequestWork | None:
        # Stores only the prefix before the block: rows [0, cache_len).
        return self._refresh(r, ensure, lambda q: q.cache_len) if self._refresh_due(r) else None

    def decode_work(self, r: Request, lead: RequestWork | None, window: tuple[int, int],
                    ensure: EnsurePages) -> RequestWork:
        if lead is not None:
            return RequestWork(r, 0, lead.end, lead.store_end, lead.groups, window, refresh=True)
        # The block and everything after it, against the stored prefix; nothing stored.
        start, end = r.cache_len, r.geometry.canvas_end
        return RequestWork(r, start, end, start, [1] * (end - start), window)


@dataclass(frozen=True)
class DualCache(_Refreshing):
    name: str = "dual-cache"
    cache_only: bool = True
    chooses_chunks: bool = True

    def lead_work(self, r: Request, ensure: EnsurePages) -> RequestWork | None:
        if self._refresh_due(r):
            return self._refresh(r, ensure, lambda q: q.geometry.canvas_end)
        return _store(r, ensure) if r.pending_store is not None else None

    def decode_work(self, r: Request, lead: RequestWork | None, window: tuple[int, int],
                    ensure: EnsurePages) -> RequestWork:
        rows_lo, rows_hi = r.rows_for(window)
        start = lead.start if lead is not None else rows_lo
        end = lead.end if lead is not None and lead.end > rows_hi else rows_hi
        # Every row is written (its slot replaced), but only rows before the window are final.
        return RequestWork(r, start, end, end, [1] * (end - start), window, final=rows_lo,
                           visible=r.geometry.canvas_end, refresh=lead is not None and lead.refresh)


def make_scheme(name: str, attention: AttentionKind, suffix_window: int = 0) -> CacheScheme:
    """The scheme named by ``--cache-mode``; ``auto``: dual cache for full-attention models,
    prefix-block (exact) for causal and block-causal ones."""
    if name not in SCHEMES:
        raise ValueError(f"cache_mode: unknown mode {name!r}; expected one of {', '.join(SCHEMES)}")
    if attention is not AttentionKind.FULL:
        if name not in ("auto", "prefix-block"):
            raise ValueError(f"cache_mode: {name} applies to full-attention models (LLaDA, Dream); "
                             f"this model's attention is {attention.value}, cached exactly by prefix-block")
        return PrefixBlock(attention)
    if suffix_window and name != "prefix-block":
        raise ValueError("suffix_window: applies to --cache-mode prefix-block only")
    if name == "prefix-block":
        return PrefixBlock(attention, suffix_window)
    return PrefixCache() if name == "prefix-cache" else DualCache()
