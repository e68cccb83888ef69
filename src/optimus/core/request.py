"""A request's CPU-side state: its tokens, its canvas, its cache cursor and its lifecycle.

Position bookkeeping (all absolute sequence positions):
- ``tokens`` holds prompt + canvas; uncommitted canvas positions hold the mask id.
- ``cache_len``: positions ``[0, cache_len)`` have K/V stored in the paged cache.
- A step runs *rows* ``[cache_len, hi - shift)`` and predicts positions ``[lo, hi)``, where
  ``shift`` is 1 for models whose row i predicts token i+1 (Dream, causal LMs), else 0.
- The window is finished once every predicted position is committed; its rows are then
  stored (the "commit group") in the next step, unless the model is causal, where rows are
  final as soon as they are computed and are stored in the same step.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np

from optimus.core.outputs import CommitEvent, RequestStats
from optimus.core.params import SamplingParams
from optimus.models.detokenizer import IncrementalDetokenizer
from optimus.models.spec import AttentionKind, ModelSpec


class RequestState(str, enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"
    ABORTED = "aborted"


_TRANSITIONS = {
    RequestState.WAITING: {RequestState.PREFILLING, RequestState.DECODING, RequestState.ABORTED},
    RequestState.PREFILLING: {RequestState.DECODING, RequestState.WAITING, RequestState.ABORTED},
    RequestState.DECODING: {RequestState.FINISHED, RequestState.WAITING, RequestState.ABORTED},
    RequestState.FINISHED: set(),
    RequestState.ABORTED: set(),
}


@dataclass(frozen=True)
class Geometry:
    """How a request's canvas is laid out for a given model."""

    block_size: int
    block_origin: int  # blocks start at origin + k * block_size
    shift: int  # 1 if row i predicts position i + 1
    prefill_len: int  # prompt rows stored by prefill
    canvas_start: int  # = prompt length
    canvas_end: int  # block-aligned end of the canvas (>= canvas_start + max_tokens)

    def block_end(self, pos: int) -> int:
        k = (pos - self.block_origin) // self.block_size + 1
        return self.block_origin + k * self.block_size


@dataclass(eq=False)  # an entity: equal only to itself (lists of requests find and remove by identity)
class Request:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    geometry: Geometry
    mask_id: int
    group: str | None = None  # admission fairness: requests of one API call share a group
    arrival_time: float = field(default_factory=time.monotonic)
    state: RequestState = RequestState.WAITING
    tokens: np.ndarray = field(default=None)  # [total] int64
    committed: np.ndarray = field(default=None)  # [total] bool
    cache_len: int = 0
    pending_store: tuple[int, int] | None = None  # rows [a, b) to store next step
    # Ends of the row segments stored one commit group at a time after the prompt (ascending):
    # each attended to itself and the cache before it, which a recompute must repeat.
    stored_ends: list[int] = field(default_factory=list)
    refreshed_block: int | None = None  # block end of the latest whole-canvas refresh (cache schemes)
    chunk: int = 0  # chunk size of the current window
    last_committed: int = 0  # positions committed in the latest step (policy feedback)
    open_after: int = -1  # masked positions left in the window after the latest commit (-1: not known)
    pages: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    output_len: int = 0  # contiguous committed answer tokens reported so far (stop-trimmed)
    answer: list[int] = field(default_factory=list)  # the contiguous committed answer's ids (>= output_len)
    stats: RequestStats = field(default_factory=RequestStats)
    events: list[CommitEvent] = field(default_factory=list)  # unreported commit events
    draws: int = 0  # sampled proposals so far: part of the noise key, as diffusion re-proposes positions
    done_text: str = ""
    frontier: int = 0  # contiguous committed answer positions (only grows)
    stop_scanned: int = 0  # answer positions already checked for stop token ids
    stop_ids: frozenset[int] | None = None  # ids that end the answer (set when first checked)
    detokenizer: IncrementalDetokenizer | None = None  # set when its text is first needed
    # Finished or aborted: set by transition() (read several times per request per step).
    is_done: bool = field(default=False, init=False)
    plain_greedy: bool | None = field(default=None, init=False)  # Postprocessor.is_plain_greedy, once known
    slot: int = field(default=-1, init=False)  # its columns in the scheduler's Canvases (-1: not adopted)
    _bounds_at: int = field(default=-1, init=False, repr=False)  # cache_len of _bounds (window_bounds)
    _bounds: tuple[int, int] = field(default=(0, 0), init=False, repr=False)

    def __post_init__(self) -> None:
        g = self.geometry
        self.tokens = np.full(g.canvas_end, self.mask_id, dtype=np.int64)
        self.tokens[:g.canvas_start] = self.prompt_ids
        self.committed = np.zeros(g.canvas_end, dtype=bool)
        self.committed[:g.canvas_start] = True
        self.stats.arrival_time = self.arrival_time

    # ---- lifecycle -------------------------------------------------------------------
    def transition(self, new: RequestState) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"request {self.request_id}: illegal transition {self.state.value} -> {new.value}")
        self.state = new
        self.is_done = new is RequestState.FINISHED or new is RequestState.ABORTED

    @property
    def fairness_key(self) -> str:
        return self.group if self.group is not None else self.request_id

    # ---- window geometry ----------------------------------------------------------------
    def window_start(self) -> int:
        """First predicted position of the next window."""
        return self.window_bounds()[0]

    def window_bounds(self) -> tuple[int, int]:
        """(first predicted position of the next window, the end of its block clipped to the
        canvas). Arithmetic inlined and kept for the cache cursor it was found at: the
        scheduler asks for every decoder several times a step (the geometry is frozen)."""
        if self._bounds_at == self.cache_len:
            return self._bounds
        g = self.geometry
        lo = self.cache_len + g.shift
        if lo < g.canvas_start:
            lo = g.canvas_start
        end = lo + g.block_size - (lo - g.block_origin) % g.block_size  # = g.block_end(lo)
        self._bounds_at, self._bounds = self.cache_len, (lo, (end if end < g.canvas_end else g.canvas_end))
        return self._bounds

    def max_chunk(self) -> int:
        lo, end = self.window_bounds()
        return end - lo

    def plan_window(self, chunk: int) -> tuple[int, int]:
        """Predicted positions [lo, hi) for a chunk of ``chunk`` canvas positions, stretched
        if needed so it holds at least one masked position (a chunk smaller than what an
        earlier, larger chunk already committed must not waste a step)."""
        lo, end = self.window_bounds()
        hi = lo + max(1, min(chunk, end - lo))
        committed = self.committed
        if hi >= end or not committed[lo]:
            return lo, hi  # the window already holds a masked position (or all there is)
        first_open = lo + 1
        while first_open < end and committed[first_open]:
            first_open += 1
        if hi <= first_open < end:
            hi = first_open + 1
        return lo, hi

    def rows_for(self, window: tuple[int, int]) -> tuple[int, int]:
        return self.cache_len, window[1] - self.geometry.shift

    def contiguous_answer_len(self) -> int:
        """Committed canvas positions from the canvas start, up to the first gap.
        Amortised O(1) a commit: commits are never undone, so the frontier only moves forward."""
        start = self.geometry.canvas_start
        at = start + self.frontier
        committed = self.committed
        end = committed.size
        while at < end and committed[at]:  # a step moves it a few positions: cheaper than a scan
            at += 1
        self.frontier = at - start
        return self.frontier


def make_geometry(spec: ModelSpec, block_size: int, prompt_len: int, max_tokens: int,
                  prefill_prompt: bool = True) -> Geometry:
    """``prefill_prompt=False``: the prompt is never prefilled (a cache scheme whose block-start
    refresh recomputes the whole sequence)."""
    causal = spec.attention is AttentionKind.CAUSAL
    shift = 1 if (spec.logit_shift or causal) else 0
    if causal:
        block_size, origin = 1, 0
    elif spec.attention is AttentionKind.BLOCK_CAUSAL:
        origin = 0  # SDAR aligns blocks to absolute position 0
    else:
        origin = prompt_len  # LLaDA/Dream: blocks start where the answer starts
    if shift:
        prefill = prompt_len - 1
    elif spec.attention is AttentionKind.BLOCK_CAUSAL:
        prefill = (prompt_len // block_size) * block_size  # the tail shares the first decode block
    else:
        prefill = prompt_len
    if not prefill_prompt:
        prefill = 0
    end = prompt_len + max_tokens
    canvas_end = origin + -(-(end - origin) // block_size) * block_size
    return Geometry(block_size, origin, shift, prefill, prompt_len, canvas_end)


def check_request(spec: ModelSpec, block_size: int, pages, prompt_ids: list[int],
                  params: SamplingParams, refresh_budget: int | None = None) -> Geometry:
    """The request's canvas layout; ValueError (``field: why``) unless it fits the model's
    vocabulary and context and ``pages`` (a PageAllocator: ``num_pages``, ``page_size``).
    ``refresh_budget``: the step token budget, when a cache scheme refreshes the whole
    sequence in one step (no prefill); the sequence must fit it."""
    if not prompt_ids:
        raise ValueError("prompt: is empty: give at least one token")
    vocab = spec.arch.vocab_size
    bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ValueError(f"prompt: token id {bad} is outside the vocabulary [0, {vocab})")
    bad = next((t for t in params.stop_token_ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ValueError(f"stop_token_ids: token id {bad} is outside the vocabulary [0, {vocab})")
    geometry = make_geometry(spec, block_size, len(prompt_ids), params.max_tokens,
                             prefill_prompt=refresh_budget is None)
    if refresh_budget is not None and geometry.canvas_end > refresh_budget:
        raise ValueError(f"max_tokens: prompt ({len(prompt_ids)} tokens) plus the canvas "
                         f"({geometry.canvas_end - len(prompt_ids)} tokens) exceeds the step token budget "
                         f"({refresh_budget}) that one whole-sequence cache refresh must fit; raise "
                         "--max-tokens-per-step or use --cache-mode prefix-block")
    if geometry.canvas_end > spec.arch.max_position:
        raise ValueError(f"max_tokens: prompt ({len(prompt_ids)} tokens) plus max_tokens "
                         f"({params.max_tokens}) exceeds the model's context length of "
                         f"{spec.arch.max_position} tokens")
    if pages.pages_for(geometry.canvas_end) > pages.num_pages:
        raise ValueError(f"max_tokens: the request needs {geometry.canvas_end} tokens of KV cache; "
                         f"the cache holds {pages.num_pages * pages.page_size}")
    return geometry
