"""After a step's commits: each request's cache cursor moves to the end of its final rows, a
finished window queues its rows' store for the next step, and the policy's feedback is gathered
(``Scheduler.complete_step``). One pass over the works: array passes over the plan's columns
measured slower at 256 requests, as each of the five per-request reads they need costs about
what the whole loop body does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from optimus.core.plan import StepPlan
from optimus.core.request import Request


@dataclass(frozen=True)
class StepOutcome:
    """Per decoding request of the step, in work order (StepFeedback's fields)."""

    rows: int  # rows the step ran (StepPlan.num_tokens)
    chunk_sizes: tuple[int, ...]
    committed: tuple[int, ...]
    request_ids: tuple[str, ...]
    open_positions: tuple[int, ...]
    refresh_rows: int  # rows the step's refreshes ran beyond their windows


def advance_each(plan: StepPlan, prefilled: Callable[[Request], None]) -> StepOutcome:
    """Move the cursors request by request; ``prefilled(r)`` after each prompt piece (the
    scheduler's check whether ``r``'s prefill is complete)."""
    chunk_sizes, committed, ids, open_positions, refreshed = [], [], [], [], 0
    for w in plan.works:
        r = w.request
        if r.is_done:
            continue
        final_end = w.final_end
        if final_end > r.cache_len:
            r.cache_len = final_end
        if w.window is None:
            prefilled(r)
            continue
        lo, hi = w.window
        if w.refresh:
            refreshed += w.end - w.start - (hi - lo)
        chunk_sizes.append(hi - lo)
        committed.append(r.last_committed)
        ids.append(r.request_id)
        still_open = r.open_after  # found by the commit, else counted
        if still_open < 0:
            still_open = r.committed[lo:hi].tolist().count(False)  # a list: 3x cheaper than numpy on a few flags
        open_positions.append(r.last_committed + still_open)
        if not still_open and final_end < w.end:  # the window finished: store its rows next,
            # with the positions after it that an earlier, wider window committed (its block's
            # rest): a window over them would predict nothing
            end, limit = hi, min(r.geometry.block_end(lo), r.geometry.canvas_end)
            while end < limit and r.committed[end]:
                end += 1
            r.pending_store = (r.cache_len, end - r.geometry.shift)
    return StepOutcome(plan.num_tokens, tuple(chunk_sizes), tuple(committed), tuple(ids), tuple(open_positions),
                       refreshed)
