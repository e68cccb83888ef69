"""Group bookkeeping shared by the attention kernel and its wrapper (kept apart so the Triton
file and the typed wrapper do not import each other)."""

from __future__ import annotations

import torch


def visible_key_end(cu_q: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """[T] int32: one past the last new row of the same request with group <= groups[i].

    Sync-free (CUDA-graph safe). Relies on groups being nondecreasing within a request:
    then (request, group) keys are globally sorted and a right searchsorted finds the end.
    """
    rows = torch.arange(groups.numel(), device=groups.device)
    req = torch.searchsorted(cu_q[1:].long(), rows, right=True)
    key = req * (1 << 33) + (groups.long() + (1 << 31))
    return torch.searchsorted(key, key, right=True).to(torch.int32)


def request_start_rows(cu_q: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[T] int32: the first new row of each row's request. As a ``key_end`` it hides every new
    row from every query (cache-only attention: the step's rows were written to the cache
    first). Sync-free (CUDA-graph safe)."""
    rows = torch.arange(num_rows, device=cu_q.device)
    req = torch.searchsorted(cu_q[1:].long(), rows, right=True)
    return cu_q.long()[req].to(torch.int32)
