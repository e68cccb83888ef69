"""The scheduler: decides, each step, which rows of which requests run, and owns the pages.

Pure Python over :class:`Request` objects, so it is unit-testable with a fake model runner.
Order of a step: running decoders first (their stored chunk + active window, sized by the
chunk policy), then prompt pieces of prefilling requests (chunked prefill shares the token
budget), then admission of waiting requests while pages and budget remain. A chunk policy
plans in what waiting prompts leave of the budget (one position per decoder at least).

A step may leave out ``busy`` requests (those of a step still in flight, whose cursors have
not moved yet): they are neither planned nor preempted, so two steps never hold one request.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import operator
import time

import numpy as np

from optimus.config import SchedulerConfig
from optimus.scheduler.cache_schemes import CacheScheme, PrefixBlock
from optimus.scheduler.cursors import advance_each
from optimus.scheduler.pages import PageAllocator
from optimus.scheduler.prefill import next_pieces, piece_len, prefill_groups
from optimus.scheduler.refresh_waves import RefreshWaves
from optimus.scheduler.views import ahead_view, refresh_rows, step_view, work_left
from optimus.policy import ChunkPolicy, StepFeedback
from optimus.core.canvases import Canvases
from optimus.core.errors import QueueFullError
from optimus.core.plan import RequestWork, StepPlan, WorkColumns, rows_of
from optimus.core.request import Request, RequestState
from optimus.models.spec import AttentionKind


_CACHE_LEN = operator.attrgetter("cache_len")
_STATE = operator.attrgetter("state")


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: PageAllocator, policy: ChunkPolicy,
                 attention: AttentionKind, scheme: CacheScheme | None = None) -> None:
        self.config, self.allocator, self.policy = config, allocator, policy
        self.scheme = scheme if scheme is not None else PrefixBlock(attention, config.suffix_window)
        self._feedback: StepFeedback | None = None  # completed, not yet observed (complete_step)
        self.attention = attention
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # admission order (oldest first)
        self._recompute_len: dict[str, int] = {}
        self._busy: frozenset[str] = frozenset()  # request ids of the step in flight (see schedule)
        self.canvases = Canvases()  # every queued and running request's canvas (array paths of a step)
        self.refresh_waves = RefreshWaves(config.refresh_wave_wait, config.refresh_wave_min_decoders)
        self._preemptions = 0  # so far: a plan checks its decoders' states only after one

    # ---- queue management ------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a request. Only requests that cannot start at the next step count against
        ``max_waiting``: the free running slots take a burst before the bound applies."""
        free_slots = max(0, self.config.max_running - len(self.running))
        if len(self.waiting) >= self.config.max_waiting + free_slots:
            raise QueueFullError(f"waiting queue is full ({self.config.max_waiting} requests)")
        self.canvases.adopt(request)
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        for queue in (self.waiting, self.running):
            for r in queue:
                if r.request_id == request_id:
                    r.transition(RequestState.ABORTED)
                    r.finish_reason = "abort"
                    self._release(r)
                    return r
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _release(self, r: Request) -> None:
        if r in self.running:
            self.running.remove(r)
        if r in self.waiting:
            self.waiting.remove(r)
        if r.pages:
            self.allocator.free(r.pages)
            r.pages = []
        self._recompute_len.pop(r.request_id, None)
        self.canvases.release(r)

    def finish(self, r: Request, reason: str) -> None:
        r.transition(RequestState.FINISHED)
        r.finish_reason = reason
        self._release(r)

    # ---- step planning ---------------------------------------------------------------
    def schedule(self, busy: frozenset[str] = frozenset(), max_decoders: int | None = None) -> StepPlan:
        """Plan a step over the running requests not in ``busy`` (request ids), the oldest
        ``max_decoders`` decoders at most (None: all of them), then prefills and admissions."""
        self._busy, budget, works = busy, self.config.max_tokens_per_step, []
        found, held = self._decoders(busy)
        found, preempted = found[:max_decoders], self._preemptions
        decoders, leads = self._plan_leads(found, budget)
        fixed = sum(w.end - w.start for w in leads.values())
        # where the leads ended no one, the decoders' slots were found with them
        slots = held[:len(found)] if held is not None and decoders is found else self.canvases.slots(decoders)
        cache_len = np.fromiter(map(_CACHE_LEN, decoders), np.int64, len(decoders))
        bounds = self._window_bounds(decoders, slots, cache_len)
        chunks = self._choose_chunks(decoders, (bounds[1] - bounds[0]).tolist(), fixed, budget)
        lo, hi = self._plan_windows(decoders, slots, bounds, chunks)
        if self._preemptions != preempted and any(r.state is not RequestState.DECODING for r in decoders):
            # preempted while planning leads
            kept = [i for i, r in enumerate(decoders) if r.state is RequestState.DECODING]
            decoders, lo, hi, slots = [decoders[i] for i in kept], lo[kept], hi[kept], None
        decode, head = self._decode_works(decoders, leads, slots, cache_len, lo, hi)
        works += decode
        for r, chunk in zip(decoders, (hi - lo).tolist()):
            r.chunk = chunk
        budget -= rows_of(works, head)
        budget = self._plan_prefills(works, budget)
        self._admit(works, budget)
        return StepPlan(works, self.canvases, head, slots)

    def _decode_works(self, decoders: list[Request], leads: dict[str, RequestWork], slots: np.ndarray | None,
                      cache_len: np.ndarray, lo: np.ndarray,
                      hi: np.ndarray) -> tuple[list[RequestWork], WorkColumns | None]:
        """The decoders' works for their windows [lo, hi) [n] after their leads, and the works'
        columns where the scheme makes them from arrays (every decoder on the canvases: ``slots``;
        ``cache_len`` [n] their cursors)."""
        at_once = getattr(self.scheme, "decode_columns", None)
        if at_once is not None and slots is not None:
            made = at_once(decoders, leads, slots, cache_len, lo, hi, self.canvases.shift[slots])
            if made is not None:
                return made
        windows = list(zip(lo.tolist(), hi.tolist()))
        return self.scheme.decode_works(decoders, leads, windows, self._ensure_pages), None

    def _decoders(self, busy: frozenset[str]) -> tuple[list[Request], np.ndarray | None]:
        """The running requests that decode this step, in order: not in ``busy``, and with a
        position left to predict (one with none only awaits its in-flight step's tokens); and
        their canvas slots. Found on the canvases' columns where every running request lives
        there (else no slots)."""
        running = self.running
        slots = self.canvases.slots(running) if running and not busy else None
        if slots is None:
            return [r for r in running if r.state is RequestState.DECODING and r.request_id not in busy
                    and r.window_bounds()[0] < r.geometry.canvas_end], None
        lo, _ = self.canvases.window_bounds(slots, np.fromiter(map(_CACHE_LEN, running), np.int64, len(running)))
        decoding = np.fromiter(map(operator.is_, map(_STATE, running), itertools.repeat(RequestState.DECODING)),
                               bool, len(running))
        keep = decoding & (lo < self.canvases.canvas_end[slots])
        return list(itertools.compress(running, keep.tolist())), slots[keep]

    def _plan_leads(self, decoders: list[Request], budget: int) -> tuple[list[Request], dict[str, RequestWork]]:
        """Reserve pages for the rows each decoder runs before its window (a finished window's
        commit group, a cache refresh), preempting if short. A refresh that does not fit the
        budget waits for a later step, unless it is the step's first (progress)."""
        if self.scheme.prefills:  # a scheme that prefills never refreshes: only stores lead
            return self._plan_stores(decoders)
        out, ready, used = {}, [], 0
        held = self.refresh_waves.held(decoders, self.scheme.lead_rows, budget)
        for r in decoders:
            if r.state is not RequestState.DECODING:
                continue
            refresh = self.scheme.lead_rows(r)
            if refresh and (r.request_id in held or (used and used + refresh > budget)):
                continue
            lead = self.scheme.lead_work(r, self._ensure_pages)
            if r.window_bounds()[0] >= r.geometry.canvas_end:
                continue  # its last window, committed by a step still in flight: it ends there
            if lead is not None:
                out[r.request_id] = lead
                used += lead.end - lead.start
            if not (refresh and lead is None):  # a refresh short of pages waits
                ready.append(r)
        return ready, out

    def _plan_stores(self, decoders: list[Request]) -> tuple[list[Request], dict[str, RequestWork]]:
        """:meth:`_plan_leads` where the only lead is a finished window's store: the requests
        with one store it (pages reserved, may preempt); the rest run their window alone."""
        preempted = self._preemptions
        out = self.scheme.store_leads([r for r in decoders if r.pending_store is not None], self._ensure_pages,
                                      self.allocator.page_size)
        # A store up to the canvas end was the last window, committed by a step still in flight:
        # the request ends there (its next window would start at the canvas end).
        ended = [rid for rid, w in out.items() if w.end + w.request.geometry.shift >= w.request.geometry.canvas_end]
        for rid in ended:
            del out[rid]
        if not ended and self._preemptions == preempted:
            return decoders, out  # all still decoding (every decoder was; only a preemption changes that)
        gone = set(ended)
        return [r for r in decoders if r.state is RequestState.DECODING and r.request_id not in gone], out

    def _window_bounds(self, decoders: list[Request], slots: np.ndarray | None,
                       cache_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each decoder's ``Request.window_bounds`` as two arrays [n]: found on the canvases'
        columns at once where every decoder lives there (``slots``, ``Canvases.slots``; its
        cursors ``cache_len`` [n])."""
        n = len(decoders)
        if slots is not None:
            return self.canvases.window_bounds(slots, cache_len)
        lo_end = np.fromiter(itertools.chain.from_iterable(r.window_bounds() for r in decoders), np.int64, 2 * n)
        return lo_end[0::2], lo_end[1::2]

    def _plan_windows(self, decoders: list[Request], slots: np.ndarray | None, bounds: tuple[np.ndarray, np.ndarray],
                      chunks: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Each decoder's window for its chunk (``Request.plan_window``) as (lo, hi) [n],
        vectorised like :meth:`_window_bounds`."""
        if slots is None:
            lo_hi = np.array([r.plan_window(c) for r, c in zip(decoders, chunks)], np.int64).reshape(-1, 2)
            return lo_hi[:, 0], lo_hi[:, 1]
        lo, end = bounds
        return lo, self.canvases.plan_windows(slots, lo, end, np.asarray(chunks, np.int64))

    def _choose_chunks(self, decoders: list[Request], caps: list[int], fixed: int, budget: int) -> list[int]:
        """Each decoder's chunk size, in order, within [1, its cap] (``caps``: each one's
        ``max_chunk``)."""
        if self.attention is AttentionKind.CAUSAL:
            return [1] * len(decoders)  # a causal LM predicts one position per step
        if not decoders or not self.scheme.chooses_chunks:
            return caps
        uniform = getattr(self.policy, "uniform_chunk", None)
        if uniform is not None and not any(r.params.policy for r in decoders):
            return [uniform if uniform < cap else cap for cap in caps]
        budget = max(budget - self._prompt_rows_waiting(budget), fixed + len(decoders))
        take_ahead = getattr(self.policy, "take_ahead", None)  # a plan made while the last step ran
        if take_ahead is not None:
            chunks = take_ahead(tuple(r.request_id for r in decoders), caps, fixed, budget)
            if chunks is not None:
                return chunks
        # Policies honour per-request overrides themselves (and count them as load).
        view = step_view(decoders, caps, fixed, budget, self._load_pending(), refresh_rows(self.scheme, decoders))
        return [max(1, min(int(c), cap)) for c, cap in zip(self.policy.choose(view), caps)]

    def learn_and_plan_ahead(self) -> None:
        """The previous step's learning (:meth:`flush_feedback`), then from it the next step's
        chunk sizes (:meth:`plan_ahead`): what the engine runs while the device computes."""
        self.flush_feedback()
        self.plan_ahead()

    def plan_ahead(self) -> None:
        """Let a policy with ``plan_ahead`` plan the next step now, while the device computes
        this one, from the feedback the next step's choice would read (the engine calls it
        after :meth:`flush_feedback`): the running decoders on block-size caps, with no budget
        (neither is known before this step commits). The next step asks the policy's
        ``take_ahead`` for it before it builds its views."""
        plan = getattr(self.policy, "plan_ahead", None)
        if plan is None or self.attention is AttentionKind.CAUSAL or not self.scheme.chooses_chunks:
            return
        decoders = [(r, left) for r in self.running if r.state is RequestState.DECODING and (left := work_left(r)) > 0]
        if decoders and not any(r.params.policy for r, _ in decoders):
            refresh = refresh_rows(self.scheme, [r for r, _ in decoders])
            plan(ahead_view(decoders, self._load_pending(), refresh))

    def _prefill_target(self, r: Request) -> int:
        """Rows ``r`` prefills: its prompt, or what it recomputes after a preemption."""
        return self._recompute_len.get(r.request_id, r.geometry.prefill_len)

    def _prompt_rows_waiting(self, budget: int) -> int:
        """Prompt rows a step would prefill with the whole ``budget`` to itself (a wider chunk
        would push them into a step of their own): each started prompt's next piece, then those
        of the requests the free slots may admit, at most what the budget and free pages hold."""
        started = (self._prefill_target(r) - r.cache_len for r in self._prefilling())
        admissible = itertools.islice(self.waiting, max(self.config.max_running - len(self.running), 0))
        room = min(budget, self.allocator.free_pages * self.allocator.page_size)
        return next_pieces(itertools.chain(started, map(self._prefill_target, admissible)), self.config.prefill_chunk, room)

    def _load_pending(self) -> bool:
        """Whether rows for others may join a step: a prompt queued or being prefilled, or a
        scheme that refreshes its cache."""
        return (bool(self.waiting) or not self.scheme.prefills
                or any(r.state is RequestState.PREFILLING for r in self.running))

    def _prefilling(self) -> list[Request]:
        """The running requests with prompt rows left to prefill, outside the step in flight."""
        return [r for r in self.running if r.state is RequestState.PREFILLING and r.request_id not in self._busy]

    def _plan_prefills(self, works: list[RequestWork], budget: int) -> int:
        for r in self._prefilling():
            n = piece_len(self.attention, self.config.prefill_chunk, r, self._prefill_target(r) - r.cache_len, budget)
            if n <= 0:
                continue
            if not self._ensure_pages(r, r.cache_len + n, preempt=False):
                break
            a, b = r.cache_len, r.cache_len + n
            works.append(RequestWork(r, a, b, b, prefill_groups(self.attention, r, a, b), None))
            budget -= n
        return budget

    def _next_waiting(self, running: collections.Counter) -> Request:
        """The next request to admit: one being recomputed after preemption (it holds
        commits) first, otherwise the oldest of the group with the fewest running requests,
        so one API call's fan-out shares the slots with every other caller instead of
        filling them. Ungrouped requests are their own group: plain FIFO among them."""
        head = self.waiting[0]
        if head.request_id in self._recompute_len:
            return head
        best, best_count = head, running.get(head.fairness_key, 0)
        for r in self.waiting:
            if best_count == 0:
                break
            count = running.get(r.fairness_key, 0)
            if count < best_count:
                best, best_count = r, count
        return best

    def _admit(self, works: list[RequestWork], budget: int) -> None:
        running = collections.Counter(r.fairness_key for r in self.running) if self.waiting else None
        while self.waiting and len(self.running) < self.config.max_running:
            r = self._next_waiting(running)
            target = self._prefill_target(r)
            need = self.allocator.pages_for(self.scheme.admit_tokens(r, target))
            if need > self.allocator.free_pages:
                break
            if target > 0 and budget <= 0:
                break
            self.waiting.remove(r)
            self.running.append(r)
            running[r.fairness_key] += 1
            r.stats.first_scheduled_time = r.stats.first_scheduled_time or time.monotonic()
            if target == 0:
                self._recompute_len.pop(r.request_id, None)
                r.transition(RequestState.DECODING)
                continue
            r.transition(RequestState.PREFILLING)
            n = piece_len(self.attention, self.config.prefill_chunk, r, target, budget)
            if n <= 0:
                continue
            self._ensure_pages(r, n, preempt=False)
            works.append(RequestWork(r, 0, n, n, prefill_groups(self.attention, r, 0, n), None))
            budget -= n

    def _ensure_pages(self, r: Request, num_tokens: int, preempt: bool = True) -> bool:
        """Grow r's pages to ``num_tokens``, preempting the newest other requests if short.

        Only the store phase (before any work of the step exists) may preempt: a victim
        must never already own rows in the step being planned."""
        while not self.allocator.ensure(r.pages, num_tokens):
            if not preempt:
                return False
            victim = next((v for v in reversed(self.running)
                           if v is not r and v.pages and v.request_id not in self._busy), None)
            if victim is None:
                return False
            self._preempt(victim)
        return True

    def _preempt(self, r: Request) -> None:
        """Free r's pages and queue it to recompute its stored rows (its commits are kept)."""
        self._recompute_len[r.request_id] = self.scheme.preempted(r)
        self.allocator.free(r.pages)
        r.pages = []
        r.stats.preemptions += 1
        self._preemptions += 1
        self.running.remove(r)
        r.transition(RequestState.WAITING)
        self.waiting.appendleft(r)

    # ---- after the forward pass --------------------------------------------------------
    def complete_step(self, plan: StepPlan, latency_s: float, overhead_s: float = 0.0,
                      hold: bool = False, device_s: float = 0.0) -> StepFeedback | None:
        """Advance cache cursors and queue the policy's feedback. The policy reads it at
        :meth:`flush_feedback`, which the engine calls once the next step's forward is
        launched: learning then overlaps the GPU, and choose(N+1) sees feedback up to N-1.
        ``hold``: return the feedback instead, for :meth:`give_feedback` once the step's
        latency is known (a step whose commits were assumed at launch)."""
        feedback = advance_each(plan, self._prefilled, latency_s, overhead_s, device_s)
        if feedback is None:
            return None
        if hold:
            return feedback
        self.give_feedback(feedback)
        return None

    def _prefilled(self, r: Request) -> None:
        """After a prompt piece of ``r``: it decodes once its prefill target is cached."""
        if r.cache_len >= self._prefill_target(r):
            self._recompute_len.pop(r.request_id, None)
            r.transition(RequestState.DECODING)

    def give_feedback(self, feedback: StepFeedback, latency_s: float | None = None,
                      overhead_s: float = 0.0, device_s: float = 0.0) -> None:
        """Queue a step's feedback; ``latency_s`` given: the timing of a step whose commits
        were assumed at launch, known only now (its feedback was held)."""
        if latency_s is not None:
            feedback = dataclasses.replace(feedback, latency_s=latency_s, overhead_s=overhead_s,
                                           device_s=device_s, overlapped=True)
        self.flush_feedback()  # never drop an unread step
        self._feedback = feedback

    def discard_feedback(self) -> None:
        """Forget an unread step's feedback (its step failed and its requests ended)."""
        self._feedback = None

    def flush_feedback(self) -> None:
        """Hand the policy the latest completed step's feedback, if it has not had it."""
        if self._feedback is not None:
            feedback, self._feedback = self._feedback, None
            self.policy.observe(feedback)
