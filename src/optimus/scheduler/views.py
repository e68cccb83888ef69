"""What the chunk policy sees of a step's decoding requests (``policy.base``'s views)."""

from __future__ import annotations

from optimus.core.request import Request
from optimus.policy import RequestView, StepView
from optimus.scheduler.cache_schemes import CacheScheme


def work_left(r: Request) -> int:
    """Answer positions from ``r``'s window start to the end of its canvas (RequestView.remaining)."""
    return r.geometry.canvas_end - r.window_bounds()[0]


def refresh_rows(scheme: CacheScheme, requests: list[Request]) -> float:
    """The mean rows a block-start refresh of ``requests`` recomputes (0: ``scheme`` never refreshes)."""
    if scheme.prefills or not requests:
        return 0.0
    return sum(map(scheme.refresh_rows, requests)) / len(requests)


def step_view(decoders: list[Request], caps: list[int], fixed: int, budget: int, load_pending: bool,
              refresh: float) -> StepView:
    """The step's view: each decoder at its cap (``Request.max_chunk``), beside ``fixed`` rows."""
    views = tuple(RequestView(r.request_id, cap, r.geometry.block_size, r.chunk or None, r.params.policy, work_left(r))
                  for r, cap in zip(decoders, caps))
    return StepView(views, fixed_tokens=fixed, token_budget=budget, load_pending=load_pending, refresh_rows=refresh)


def ahead_view(decoders: list[tuple[Request, int]], load_pending: bool, refresh: float) -> StepView:
    """The next step's view, taken while this one runs (``Scheduler.plan_ahead``): ``decoders``
    as (request, work left), on block-size caps, with no budget (neither is known yet)."""
    views = tuple(RequestView(r.request_id, r.geometry.block_size, r.geometry.block_size, None, None, left)
                  for r, left in decoders)
    return StepView(views, fixed_tokens=0, token_budget=1 << 30, load_pending=load_pending, refresh_rows=refresh)
