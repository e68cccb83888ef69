"""`elastic`: the saturation-aware chunk controller (control law in docs/policies.md).

Cost model, per decoding request at chunk ``C`` (amortised over the steps of one chunk):
the chunk costs ``C`` rows every step, and once all its positions are committed it is stored
by one more forward row per position in the next step. A chunk lasts ``C / tau(C)`` steps, so
the store adds ``tau(C)`` rows per step on average: ``cost(C) = C + tau(C)`` and the request
commits ``tau(C)`` per step. ``ar`` (C=1, tau=1) therefore costs 2 rows per committed token in
this engine: the committed position is computed once as a mask and once more when stored.

Each step the controller maximises predicted committed tokens per second
``J = sum_r tau(C_r) / (H + T(sum_r cost(C_r)))`` over the chunk sizes, where ``T`` is the
profiled latency curve with an online correction, ``H`` the host time every step pays around
its forward (scheduling, reporting, serving, and what the step waits for on the host: building
the batch, committing; measured beside the device's own time where the engine reports it),
and ``cost`` also carries ``pi * tau(C)``: the rows the step runs for others (prefill pieces,
pinned requests), measured per committed token, because every answer token brings its share
of prompt to prefill, and ``rho * tau(C)``: a cache scheme's block-start refreshes, known
ahead (``refreshes.py``). Allocation is greedy by marginal efficiency on each request's concave
ladder of sizes (``ladders.py``); equal upgrades go to the requests with the most work left
(then the oldest), so requests that started together progress together.

Requests differ: a confident answer commits most of a large chunk at once, prose continued by
a small model barely more than one token whatever the chunk. Each request therefore plans on
its own curve ``1 + L (tau(C) - 1)``, its level ``L`` measured from its own commits
(:class:`RequestConfidence`), so one step can run some requests at 1 and others at 32.

Where the engine overlaps steps whose windows all hold one open position (``unit_steps_overlap``:
commits known at launch, the host plans step N+1 while the device runs N), the plan with
everyone at size 1 pays the device's time alone (measured between overlapped steps' ends, the
time also carries the host's work for the steps around them: noisier than none while it keeps up).
Where graphs serve the steps, a bucket measured lately is priced at what it measured
(:class:`BucketMemory`), others at the corrected profile.
"""

from __future__ import annotations

import collections
import math
import operator

import numpy as np

from optimus.policy.elastic.latency import LatencyProfile
from optimus.policy.base import StepFeedback, StepView, override_chunk
from optimus.policy.elastic.bucket_memory import BucketMemory
from optimus.policy.elastic.confidence import RequestConfidence
from optimus.policy.elastic.estimators import LatencyCorrector, TauEstimator, TokenLoad, expected_latency
from optimus.policy.elastic.graph_buckets import GraphBuckets
from optimus.policy.elastic.host_share import HostShare, StepGaps
from optimus.policy.elastic.ladders import Ladder, Rungs, build_ladder, by_work_left, merge_rungs, store_variance
from optimus.policy.elastic.plans import Curve, Plan
from optimus.policy.elastic.refreshes import RefreshLoad

DEFAULT_CHUNK_SIZES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_KNEE = 256  # tokens; used only without a profile, until corrected online
# fields of RequestViews
_BLOCK_SIZE, _MAX_CHUNK = operator.attrgetter("block_size"), operator.attrgetter("max_chunk")
_REQUEST_ID, _OVERRIDE = operator.attrgetter("request_id"), operator.attrgetter("policy_override")
_REMAINING = operator.attrgetter("remaining")


class ElasticPolicy:
    """Saturation-aware chunk sizes. ``profile``: the device's latency curve (None: a generic
    knee at DEFAULT_KNEE tokens scaled by the first measured step, corrected online);
    ``tau_prior``: expected commits per step by chunk size; ``hysteresis``: a new plan must
    beat the current one by this predicted fraction before it replaces it; ``per_request``:
    plan each request on its own measured confidence (False: everyone on the shared curve)."""

    def __init__(self, profile: LatencyProfile | None = None, tau_prior: dict[int, float] | None = None,
                 chunk_sizes: tuple[int, ...] = DEFAULT_CHUNK_SIZES, hysteresis: float = 0.02,
                 tau_decay: float = 0.98, load_rate: float = 0.05,
                 per_request: bool = True, unit_steps_overlap: bool = False,
                 graph_buckets: GraphBuckets | None = None, name: str = "elastic") -> None:
        if not chunk_sizes or min(chunk_sizes) < 1:
            raise ValueError("elastic policy needs chunk sizes >= 1")
        if hysteresis < 0:
            raise ValueError("hysteresis must be >= 0")
        self.name = name
        self.chunk_sizes = tuple(sorted(set(int(c) for c in chunk_sizes) | {1}))
        self.hysteresis = hysteresis
        # Without a profile: a generic knee in arbitrary units, rescaled by the first step.
        self.profile = profile or LatencyProfile.synthetic(1.0, DEFAULT_KNEE, 1.0 / DEFAULT_KNEE)
        self._rescale = profile is None
        self.tau = TauEstimator(self.chunk_sizes, tau_prior, decay=tau_decay, adapt_prior=True)
        self.correction = LatencyCorrector(self.profile.knee)
        self.buckets = graph_buckets  # steps served from CUDA graphs cost their bucket (graph_buckets.py)
        self.memory = BucketMemory()  # what each bucket measured, where graphs serve the steps
        self.load = TokenLoad(rate=load_rate)  # learned: the rows others bring (prefill pieces)
        self.refreshes = RefreshLoad(rate=load_rate)  # known ahead (StepView.refresh_rows), their spread learned
        self.gaps = StepGaps()  # host time between steps, outside the forward (StepFeedback.overhead_s)
        # Host time in a whole step's latency beside its device time (none while that is unknown).
        self.host = HostShare()
        self.unit_steps_overlap = unit_steps_overlap
        self.confidence = RequestConfidence() if per_request else None
        self.target: int | None = None  # hysteresis state: planned positions of the elastic requests
        self.retargets = 0
        self.last_plan: Plan | None = None
        # Choices not yet observed, oldest first: (request ids, sizes, confidence levels). The
        # engine observes step N after choosing step N+1, so two may be pending.
        self._choices: collections.deque[tuple[frozenset, np.ndarray, np.ndarray]] = collections.deque(maxlen=4)
        # Ladders by (planning cap, level), rate curves by (ladder keys, pinned, batch): valid
        # until observe moves the estimates. Observe rebuilds the latest choice's curve while
        # the GPU runs, so choose mostly looks it up: while that guess holds (under arrivals and
        # finishes it mostly does not, and a curve built for nothing costs a host-bound step).
        self._ladders: dict[tuple[int, float], Ladder] = {}
        self._curves: dict[tuple, Curve] = {}
        self._latest: tuple | None = None  # (request ids, caps, pinned, batch, load pending) of the latest choice
        self._guess: tuple | None = None  # the curve signature observe expects choose to ask for
        self.guess_hits = 1.0  # how often choose asked for it (moving average); built ahead while >= 1/2
        # plan_ahead's (request ids, levels, sizes); how often a step took it (moving average).
        self._ahead: tuple[tuple[str, ...], np.ndarray, np.ndarray] | None = None
        self.ahead_hits, self._ahead_skipped = 1.0, 0

    # ---- the model the decision reads ----------------------------------------------------
    @property
    def overhead_s(self) -> float:
        """Host seconds between two whole steps (:class:`StepGaps`)."""
        return self.gaps.seconds

    def _tau(self, sizes: np.ndarray, levels: np.ndarray | float = 1.0) -> np.ndarray:
        """Expected commits per step at ``sizes`` of requests at confidence ``levels``."""
        return np.clip(1.0 + levels * (self.tau(sizes) - 1.0), 1.0, np.maximum(sizes, 1.0))

    def _own_rows(self, sizes: np.ndarray, levels: np.ndarray) -> tuple[float, float]:
        """Rows per step requests at these sizes run themselves (chunk and store), and the
        variance of those rows (store lumps): the step's load the plan accounts for."""
        taus = self._tau(sizes, levels)
        return float(np.sum(sizes + taus)), float(np.sum(store_variance(sizes, taus)))

    def _cost(self, sizes: np.ndarray) -> np.ndarray:
        """... plus its share of the load that comes with each committed token (prefill)."""
        return sizes + self._rows_per_commit() * self.tau(sizes)

    def _rows_per_commit(self) -> float:
        return 1.0 + self.load.per_commit + self.refreshes.per_commit  # its store, its share of prefill and refreshes

    def _variance(self, sizes: np.ndarray, levels: np.ndarray | float = 1.0) -> np.ndarray:
        return store_variance(sizes, self._tau(sizes, levels))

    def _levels(self, request_ids) -> list[float]:
        if self.confidence is None:
            return [1.0 for _ in request_ids]
        return self.confidence.levels(request_ids)

    def predict_latency(self, tokens: np.ndarray, batch: int) -> np.ndarray:
        """Corrected latency curve at step token counts ``tokens`` [K], at the rows those steps run."""
        rows = self._rows_run(tokens)
        corrected = self.correction(self.profile.predict_many, rows, batch)
        if self.buckets is None:
            return corrected
        return self.memory.apply(self.buckets.key(tokens), rows, corrected, lambda n: self.profile.predict_many(n, batch))

    def _rows_run(self, tokens):
        """The rows steps of ``tokens`` run: their graph buckets' where graphs serve them. The
        correction fits and predicts on these: its stretch of the token axis must not move a
        step across a bucket edge (replaying the H100 LLaDA2.0-mini sweep's steps at 64 requests
        on a CPU, it fitted a stretch of 2, which priced 1,136 rows at the 1,024-row graph)."""
        return tokens if self.buckets is None else self.buckets.pad(tokens)

    def _host_s(self, tokens: np.ndarray, everyone_unit: np.ndarray) -> np.ndarray:
        """The host time steps of ``tokens`` [K] pay around their forwards; none where every
        request is at size 1 (``everyone_unit`` [K]) and the engine overlaps such steps."""
        host = self.overhead_s + self.host(tokens)
        return np.where(everyone_unit, 0.0, host) if self.unit_steps_overlap else host

    # ---- ChunkPolicy ---------------------------------------------------------------------
    def plan_ahead(self, view: StepView) -> None:
        """Plan the next step off its critical path (``Scheduler.plan_ahead``). While under half
        the plans are taken, one step in eight plans: a plan for nothing costs a host-bound step."""
        self._ahead, self._ahead_skipped = None, (self._ahead_skipped + 1) % 8
        if self.ahead_hits >= 0.5 or not self._ahead_skipped:
            ids = tuple(map(_REQUEST_ID, view.requests))
            levels = self._levels(ids)
            self._ahead = ids, np.array(levels), np.array(self._allocate(view, view.requests, ids, levels, np.zeros(0)))

    def take_ahead(self, request_ids: tuple[str, ...], max_chunks: list[int], fixed_tokens: int,
                   token_budget: int) -> list[int] | None:
        """The plan made ahead for these requests (this order), clipped to ``max_chunks``, if it
        fits the budget beside ``fixed_tokens``; else None (ask ``choose``). Consumes the plan."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        out = np.minimum(ahead[2], max_chunks) if ahead[0] == request_ids else None
        hit = out is not None and fixed_tokens + int(out.sum()) <= token_budget
        self.ahead_hits += 0.1 * (hit - self.ahead_hits)
        if not hit:
            return None
        self._choices.append((frozenset(request_ids), out.astype(float), ahead[1]))
        return out.tolist()

    def choose(self, view: StepView) -> list[int]:
        ids = tuple(map(_REQUEST_ID, view.requests))
        levels = self._levels(ids)
        if list(map(_OVERRIDE, view.requests)).count(None) == len(ids):  # nobody pinned: all elastic
            out = self._allocate(view, view.requests, ids, levels, np.zeros(0)) if ids else []
        else:
            out = [override_chunk(r) for r in view.requests]
            levels = [1.0 if c is not None else level for c, level in zip(out, levels)]
            elastic = [i for i, c in enumerate(out) if c is None]
            pinned = np.array([c for c in out if c is not None], dtype=float)
            if elastic:
                chosen = self._allocate(view, [view.requests[i] for i in elastic], tuple(ids[i] for i in elastic),
                                        [levels[i] for i in elastic], pinned)
                for i, c in zip(elastic, chosen):
                    out[i] = c
        self._choices.append((frozenset(ids), np.array(out, dtype=float), np.array(levels)))
        return out

    def observe(self, feedback: StepFeedback) -> None:
        if self.confidence is None:
            self.tau.observe(feedback.chunk_sizes, feedback.committed)
        else:
            sizes = np.array(feedback.chunk_sizes, dtype=float)
            levels = np.array(self.confidence.levels(feedback.request_ids))
            # A window holding m masked positions can commit at most m: judge each request
            # against min(tau(C), m) over min(C, m) positions, or block tails read as hesitancy.
            expected, judged = self.tau(sizes), feedback.chunk_sizes
            if feedback.open_positions:
                open_ = np.array(feedback.open_positions, dtype=float)
                expected = np.minimum(expected, open_)
                judged = np.minimum(feedback.chunk_sizes, feedback.open_positions)
            self.confidence.observe(feedback.request_ids, judged, feedback.committed, expected)
            # Rescaled to the shared curve, weighted by level (TauEstimator): hesitant requests weigh little.
            excess = np.array(feedback.committed, dtype=float) - 1.0
            self.tau.observe(feedback.chunk_sizes, 1.0 + excess / np.maximum(levels, 1e-9), levels)
        prompts = _mostly_prompts(feedback)
        # A prompt step's host time went to its prompts (a batch arriving at once priced decoding
        # steps 4.7 ms on the H100 at 256 requests, not 1.6-3).
        if not prompts:
            self.gaps.observe(feedback.overhead_s, feedback.overlapped)
        if feedback.latency_s > 0 and feedback.num_tokens > 0:
            self._observe_latency(feedback, prompts)
        choice = self._own_choice(feedback)
        if choice is not None:
            rows, var = self._own_rows(*choice)
            # the refreshes' rows are known, as the requests' own are: the load learns the rest
            self.load.observe(feedback.num_tokens, rows + feedback.refresh_rows, var, sum(feedback.committed))
        self.refreshes.observe(feedback.refresh_rows, sum(feedback.committed))
        self._ladders, self._curves = {}, {}  # the estimates moved: rebuild what is likely next
        if self._latest is not None:
            ids, caps, pinned, batch, load_pending = self._latest
            guess, self._guess = (tuple(zip(caps, self._levels(ids))), pinned, batch, load_pending), None
            if self.guess_hits >= 0.5:
                self._curve_for(*guess)
            self._guess = guess  # judged by choose's first ask

    def _observe_latency(self, feedback: StepFeedback, prompts: bool) -> None:
        """The latency curve learns the device's time where the engine reports it (the profile is
        the device's), the host's share apart: it does not grow with tokens as the device's does."""
        device = feedback.device_s if 0 < feedback.device_s <= feedback.latency_s else 0.0
        if device and not prompts and not feedback.overlapped:
            self.host.observe(feedback.num_tokens, feedback.latency_s - device)
        else:
            self.host.idle_step()
        seconds = device or feedback.latency_s
        if self._rescale:
            t0 = seconds / max(1.0, feedback.num_tokens / DEFAULT_KNEE)
            self.profile = LatencyProfile.synthetic(t0, DEFAULT_KNEE, t0 / DEFAULT_KNEE)
            self._rescale = False
        rows, batch = float(self._rows_run(feedback.num_tokens)), max(len(feedback.chunk_sizes), 1)
        self.correction.observe(self.profile.predict_many, rows, batch, seconds)
        if self.buckets is not None and not prompts:  # eager steps too, by band: their launches pace them
            key = float(self.buckets.key(feedback.num_tokens))
            self.memory.observe(key, seconds, float(self.profile.predict_many(np.array([rows]), batch)[0]))

    def _curve_for(self, keys: tuple, pinned: tuple, batch: int, load_pending: bool) -> Curve:
        signature = (keys, pinned, batch, load_pending)
        if self._guess is not None:  # the first ask since observe: was its guess right?
            self.guess_hits += 0.1 * ((signature == self._guess) - self.guess_hits)
            self._guess = None
        curve = self._curves.get(signature)
        if curve is None:
            curve = self._curves[signature] = self._build_curve(keys, np.array(pinned, dtype=float), batch, load_pending)
        return curve

    def _build_curve(self, keys: tuple, pinned: np.ndarray, batch: int, load_pending: bool) -> Curve:
        """Predicted rate of every allocation along the greedy's rungs; ``keys``: each
        elastic request's (planning cap, level); ``batch``: all requests of the step;
        ``load_pending``: whether rows for others may join the step (``StepView.load_pending``)."""
        per_commit = self._rows_per_commit()
        rungs = merge_rungs({key: self._ladder_for(key) for key in set(keys)}, list(keys))
        n = len(keys)
        # Everyone at size 1 (tau(1) = 1: one commit, 1 + per_commit rows), plus the pinned.
        base_gain, base_cost, base_var = float(n), n * (1.0 + per_commit), 0.0
        if pinned.size:
            base_gain += float(np.sum(self.tau(pinned)))
            base_cost += float(np.sum(self._cost(pinned)))
            base_var += float(np.sum(self._variance(pinned)))
        tokens = base_cost + rungs.cost
        # Rows every step runs whatever arrives: the chunks, and one store row per request at
        # size 1. Above them two lumps: larger chunks' stores, the load others bring per commit.
        lifted = np.concatenate([[0.0], np.cumsum(rungs.size_before == 1)])
        floor = n + rungs.positions + (n - lifted) + (float(np.sum(pinned)) if pinned.size else 0.0)
        load = self.load.per_commit * (base_gain + rungs.gain)
        refreshes = self.refreshes.lump(base_gain + rungs.gain)
        lumps = [(np.maximum(tokens - floor - load - refreshes[0], 0.0), base_var + rungs.var)]
        if load_pending:  # a step prefills only prompts that wait: after a burst, none comes
            lumps.append((load, self.load.extra_var))
        if self.refreshes.rows:
            lumps.append(refreshes)
        device = expected_latency(lambda x: self.predict_latency(x, batch), floor, lumps, self.load.largest)
        everyone_unit = (np.arange(len(tokens)) == 0) & (not np.any(pinned > 1))  # rung 0: all at size 1
        latency = self._host_s(tokens, everyone_unit) + device  # the host's time too: larger steps amortise it
        return Curve(rungs, tokens, latency, (base_gain + rungs.gain) / latency)

    def _ladder_for(self, key: tuple[int, float]) -> Ladder:
        lad = self._ladders.get(key)
        if lad is None:
            cap, level = key
            lad = self._ladders[key] = build_ladder(cap, self.chunk_sizes, lambda c: self._tau(c, level),
                                                    self._rows_per_commit())
        return lad

    def _own_choice(self, feedback: StepFeedback) -> tuple[np.ndarray, np.ndarray] | None:
        """The choice that produced this feedback: the oldest pending one whose requests cover
        the feedback's (older ones belonged to steps that reported nothing; consumed, never reused)."""
        ids = set(feedback.request_ids)
        while self._choices:
            requests, sizes, levels = self._choices.popleft()
            if ids <= requests:
                return sizes, levels
        return None

    # ---- the control law -----------------------------------------------------------------
    def _allocate(self, view: StepView, requests, ids: tuple[str, ...], levels: list[float],
                  pinned: np.ndarray) -> list[int]:
        """Sizes of the elastic ``requests`` (their ``ids`` and confidence ``levels``) beside the ``pinned``."""
        n = len(requests)
        blocks = np.fromiter(map(_BLOCK_SIZE, requests), np.int64, n)
        max_chunks = np.fromiter(map(_MAX_CHUNK, requests), np.int64, n)
        # Planning caps ignore block ends; one ladder per (cap, confidence level).
        caps = tuple(np.clip(blocks, 1, max(self.chunk_sizes)).tolist())
        if self.refreshes.see(view.refresh_rows, blocks):
            self._ladders, self._curves = {}, {}
        pinned_sizes, batch = tuple(pinned.tolist()), len(view.requests)
        self._latest = (ids, caps, pinned_sizes, batch, view.load_pending)
        keys = tuple(zip(caps, levels))
        curve = self._curve_for(keys, pinned_sizes, batch, view.load_pending)
        rungs, rate = curve.rungs, curve.rate
        # The rungs rank requests of one ladder oldest first; their upgrades go to the ones with
        # the most work left instead (request rungs.request[u] stands for assign[...]).
        blocks_left = -(-np.fromiter(map(_REMAINING, requests), np.int64, n) // np.maximum(blocks, 1))
        assign = by_work_left(keys, blocks_left)
        fixed = view.fixed_tokens + float(np.sum(pinned)) + n
        if fixed + rungs.positions[-1] > view.token_budget:
            # The budget may bind: cut where the step's real rows (chunks clipped to the
            # block ends, never more than planned) pass it.
            actual = fixed + rungs.actual(max_chunks[assign].astype(float))
            feasible = int(np.searchsorted(actual, view.token_budget, side="right")) - 1
            rate = rate.copy()
            rate[max(feasible, 0) + 1:] = -np.inf
        best = int(np.argmax(rate))  # first maximum: fewer tokens on ties
        m, retargeted = self._apply_hysteresis(rungs, rate, best, n)
        sizes = np.ones(n, dtype=int)
        np.maximum.at(sizes, assign[rungs.request[:m]], rungs.size[:m].astype(int))
        out = np.minimum(sizes, max_chunks).tolist()
        self.last_plan = Plan(self.target or 0, int(n + rungs.positions[m]), float(curve.tokens[m]),
                              float(curve.latency[m]), float(rate[m]), retargeted)
        return out

    def _apply_hysteresis(self, rungs: Rungs, rate: np.ndarray, best: int, n: int) -> tuple[int, bool]:
        """Keep the current target (planned chunk positions) unless the best allocation is
        predicted to be better by more than ``hysteresis``; returns (upgrades applied, moved)."""
        if self.target is not None:
            kept = int(np.searchsorted(n + rungs.positions, self.target, side="right")) - 1
            kept = min(max(kept, 0), len(rate) - 1)
            while kept > 0 and not math.isfinite(rate[kept]):
                kept -= 1  # over the token budget: step down, the target itself is kept
            if rate[best] <= (1.0 + self.hysteresis) * rate[kept]:
                return kept, False
        self.target = int(n + rungs.positions[best])
        self.retargets += 1
        return best, True


def _mostly_prompts(feedback: StepFeedback) -> bool:
    """A step mostly of prompt rows (a window and its store run at most twice its positions):
    its host time went to the prompts, not what a decoding plan pays."""
    return feedback.num_tokens - feedback.refresh_rows > 2 * sum(feedback.chunk_sizes) + len(feedback.chunk_sizes)
