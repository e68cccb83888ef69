"""Refresh waves: a cache refresh that is due may wait a few steps for others to join it.

Under the refreshing cache schemes (dual cache, prefix cache) a request recomputes its whole
sequence at each block start. When requests drift apart (any chunk above 1 commits a random
number of positions), their refreshes spread over many steps, each of them a large step run
eagerly with every other decoder's rows. Packed into fewer steps, the same refresh rows cost
less. So a due refresh is held while the refreshes due fill less than one step's budget and
another decoder is about to join them (its block nearly done), for at most ``max_wait``
steps; never when every decoder is due (progress), and only in steps of ``min_decoders`` or
more. Replaying an H100's dual-cache steps on a CPU (LLaDA-8B shape, real-8b acceptance;
docs/policies.md): at 128 requests elastic 2,351 -> 2,392 device tok/s (ar 2,400 either way),
fixed:2 and fixed:4 +0.9%, 64 requests unchanged within 0.2%; held at 16 requests as well (and
without waiting for a joiner), every policy lost 2-4%: a held request simply loses its steps there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from optimus.core.request import Request


@dataclass
class RefreshWaves:
    max_wait: int = 0  # steps a due refresh may wait for a fuller wave (0: never held)
    min_decoders: int = 0  # fewer decoders in the step: never held
    _step: int = 0
    _due_since: dict[str, int] = field(default_factory=dict)  # request id -> the step it became due

    def held(self, decoders: Sequence[Request], lead_rows: Callable[[Request], int], budget: int) -> frozenset[str]:
        """Ids of the decoders whose due refresh waits this step (called once per planned step)."""
        if self.max_wait <= 0 or len(decoders) < self.min_decoders:
            self._due_since.clear()  # a wait counts only the steps it could be held in
            return frozenset()
        self._step += 1
        due = {r.request_id: rows for r in decoders if (rows := lead_rows(r))}
        self._due_since = {rid: self._due_since.get(rid, self._step) for rid in due}
        if not due or len(due) == len(decoders):
            return frozenset()
        # a fuller wave is possible only while one more refresh still fits beside the others'
        # windows (a row each at least)
        room = budget - (len(decoders) - len(due))
        if sum(due.values()) + max(due.values()) > room:
            return frozenset()
        if self._step - min(self._due_since.values()) >= self.max_wait:
            return frozenset()
        if not any(_open_in_block(r) <= 2 * self.max_wait for r in decoders if r.request_id not in due):
            return frozenset()  # nobody joins within the wait (at a commit or two a step)
        return frozenset(due)


def _open_in_block(r: Request) -> int:
    """Positions of r's current block still masked."""
    lo, end = r.window_bounds()
    return end - lo - int(r.committed[lo:end].sum())
