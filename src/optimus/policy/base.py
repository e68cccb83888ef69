"""The chunk-policy interface. The scheduler asks a policy once per step for every decoding
request's chunk size, then reports what the step cost and committed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

from optimus.core.params import parse_policy_name


class RequestView(NamedTuple):  # a tuple: one is built per decoding request per step
    request_id: str
    max_chunk: int  # positions from the window start to the end of the current block (>= 1)
    block_size: int
    current_chunk: int | None  # the request's latest chunk size (a hint; policies may change it)
    policy_override: str | None = None  # 'ar' | 'fixed:C' pin this request; 'elastic'/None: the policy decides
    remaining: int = 0  # answer positions from the window start to the end of its budget (its work left)


@dataclass(frozen=True)
class StepView:
    requests: tuple[RequestView, ...]  # decoding requests that need a chunk this step, oldest first
    fixed_tokens: int  # tokens already in this step (prefill pieces, commit groups)
    token_budget: int  # hard cap on tokens per step: fixed_tokens + sum(chunks) <= token_budget
    # Whether rows for others may join this step beyond fixed_tokens: prompts waiting to be
    # prefilled (admitted or queued), cache refreshes. False: the step runs only its chunks,
    # their stores and fixed_tokens (after a burst of prompts is prefilled, nothing else comes).
    load_pending: bool = True
    # Rows one decoding request's block-start refresh recomputes (prompt + canvas, the mean over
    # the requests; 0: the cache scheme never refreshes). Known ahead, one per block of commits:
    # a load per committed token the policy need not learn from the steps' rows.
    refresh_rows: float = 0.0


@dataclass(frozen=True)
class StepFeedback:
    num_tokens: int  # tokens the forward pass processed
    latency_s: float  # measured wall time of the step; 0 = no latency evidence
    chunk_sizes: tuple[int, ...]  # per decoding request, the chunk size it ran
    committed: tuple[int, ...]  # per decoding request, positions committed this step
    request_ids: tuple[str, ...]  # per decoding request, its id (same order)
    # Per decoding request, the still-masked positions its window held (<= chunk size; a
    # window late in a block holds fewer). Empty when unknown: then every position counts.
    open_positions: tuple[int, ...] = ()
    # Host time since the previous step ended, spent scheduling this one and reporting the
    # last (serving, streaming): a cost every step pays on top of its forward. 0 = unknown
    # (the engine was idle in between).
    overhead_s: float = 0.0
    # The step's own time on the device (its forward and pick; 0 = unknown): the rest of
    # ``latency_s`` is host work the step waited for (building the batch, committing).
    device_s: float = 0.0
    # Its commits were assumed at launch (every window held one open position), so the host
    # planned the next step while the device ran it: ``latency_s`` is the time between two
    # step ends, and ``overhead_s`` was spent while the device was busy.
    overlapped: bool = False
    # Rows the step's block-start refreshes ran beyond their windows (StepView.refresh_rows).
    refresh_rows: int = 0


class ChunkPolicy(Protocol):
    name: str
    # A policy may also have ``uniform_chunk`` (int): the chunk every request gets, clipped to its
    # max_chunk, when none has its own override; the scheduler then skips the views (``choose``
    # must agree). It may have ``plan_ahead(view)``: the scheduler's view of the next step, taken
    # while the device computes this one (block-size caps, no budget: ``Scheduler.plan_ahead``),
    # and ``take_ahead(request_ids, max_chunks, fixed_tokens, token_budget)``: that plan for the
    # step, clipped, or None (then ``choose``), asked before the step's views are built.

    def choose(self, view: StepView) -> list[int]:
        """Chunk size per request of ``view.requests``, each in [1, max_chunk]."""
        ...

    def observe(self, feedback: StepFeedback) -> None:
        """Closed-loop feedback after each step; stateless policies ignore it."""
        ...


def override_chunk(request: RequestView) -> int | None:
    """The chunk a request's own ``ar``/``fixed:C`` override pins it to (clipped), else None."""
    if request.policy_override is None:
        return None
    kind, c = parse_policy_name(request.policy_override)
    return None if kind == "elastic" else max(1, min(c, request.max_chunk))
