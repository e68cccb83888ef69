"""After a step's commits: each request's cache cursor moves to the end of its final rows, a
finished window queues its rows' store for the next step, and the policy's feedback is gathered
(``Scheduler.complete_step``). One pass over the works: array passes over the plan's columns
measured slower at 256 requests, as each of the five per-request reads they need costs about
what the whole loop body does."""

from __future__ import annotations

from collections.abc import Callable

from optimus.core.plan import StepPlan
from optimus.core.request import Request
from optimus.policy import StepFeedback


def advance_each(plan: StepPlan, prefilled: Callable[[Request], None], latency_s: float, overhead_s: float,
                 device_s: float) -> StepFeedback | None:
    """Move the cursors request by request; ``prefilled(r)`` after each prompt piece (the
    scheduler's check whether ``r``'s prefill is complete). -> the step's feedback for the
    policy, with its timings (None: no request decoded)."""
    chunk_sizes, committed, ids, open_positions, refreshed = [], [], [], [], 0
    # bound once: the loop runs once per request per step, on the path between two steps
    add_chunk, add_committed, add_id, add_open = chunk_sizes.append, committed.append, ids.append, open_positions.append
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
        add_chunk(hi - lo)
        add_committed(r.last_committed)
        add_id(r.request_id)
        still_open = r.open_after  # found by the commit, else counted
        if still_open < 0:
            still_open = r.committed[lo:hi].tolist().count(False)  # a list: 3x cheaper than numpy on a few flags
        add_open(r.last_committed + still_open)
        if not still_open and final_end < w.end:  # the window finished: store its rows next,
            # with the positions after it that an earlier, wider window committed (its block's
            # rest): a window over them would predict nothing
            end, limit = hi, min(r.geometry.block_end(lo), r.geometry.canvas_end)
            while end < limit and r.committed[end]:
                end += 1
            r.pending_store = (r.cache_len, end - r.geometry.shift)
    if not chunk_sizes:
        return None
    return StepFeedback(plan.num_tokens, latency_s, tuple(chunk_sizes), tuple(committed), tuple(ids),
                        tuple(open_positions), overhead_s, device_s, refresh_rows=refreshed)
