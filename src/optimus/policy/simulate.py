"""Closed-loop simulation of a chunk policy on a synthetic device, for tests and benchmarks.

The simulated engine follows the real one's step: each decoding request runs its active
chunk, and a chunk whose positions are all committed is stored by one more forward row per
position in the next step. A chunk runs to completion at the size it started with (the policy
is still asked every step, as the engine asks it). Load is held constant: a finished request is
replaced at once by a new one, appended last (the engine's admission order).

Each request draws its commit table from the given tables (one table: a homogeneous
population; several: a mix, e.g. confident answers and hesitant prose). The commit model
reproduces a table ``tau(C)`` exactly in expectation: a chunk of ``C``
positions takes ``C / tau(C)`` steps on average (rounded up or down at random), and its
commits are split at random among those steps, at least one per step.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from collections import Counter
from typing import Callable, NamedTuple

import numpy as np

from optimus.policy.base import ChunkPolicy, RequestView, StepFeedback, StepView

CONCAVE_TAU = {1: 1.0, 2: 1.8, 4: 3.1, 8: 4.8, 16: 6.5, 32: 8.0}  # a threshold-0.9-like table


class TauTable:
    """True commits per step by chunk size: linear between entries, flat past the last, <= C."""

    def __init__(self, table: dict[int, float]) -> None:
        self.table = dict(table)
        self._sizes = sorted(self.table)
        self._cache: dict[int, float] = {}

    def __call__(self, c: int) -> float:
        if c not in self._cache:
            self._cache[c] = float(min(c, np.interp(c, self._sizes, [self.table[s] for s in self._sizes])))
        return self._cache[c]

    def schedule(self, c: int, rng: random.Random) -> list[int]:
        """Commits per step that finish a chunk of ``c`` positions."""
        if c == 1:
            return [1]
        mean_steps = c / self(c)
        steps = math.floor(mean_steps) + int(rng.random() < mean_steps - math.floor(mean_steps))
        steps = min(max(steps, 1), c)
        edges = [0, *sorted(rng.sample(range(1, c), steps - 1)), c]
        return [b - a for a, b in zip(edges, edges[1:])]


class ReplayTable(TauTable):
    """Commits drawn the way a benchmark replays an acceptance profile: each step of a chunk
    draws from the steps that held as many masked positions (``Acceptance.by_open``), so late
    steps of a chunk commit few because few are left. ``tau(C)`` is the profile's window tau."""

    def __init__(self, acceptance) -> None:
        super().__init__({int(c): float(t) for c, t in acceptance.window_tau().items()})
        self.acceptance = acceptance
        self._draws: dict[int, list[int]] = {}

    def schedule(self, c: int, rng: random.Random) -> list[int]:
        out, left = [], c
        while left > 0:
            if left not in self._draws:
                self._draws[left] = self.acceptance.commits_given_masked(c, left) or [1]
            k = min(left, max(1, rng.choice(self._draws[left])))
            out.append(k)
            left -= k
        return out


@dataclass(frozen=True)
class KneeDevice:
    """``T(n) = t0 + slope * max(0, n - knee)`` times log-normal noise of sd ``noise``."""

    t0: float = 0.010
    knee: float = 384.0
    slope: float = 0.010 / 384.0
    noise: float = 0.0

    def step_seconds(self, tokens: int, rng: random.Random) -> float:
        t = self.t0 + self.slope * max(0.0, tokens - self.knee)
        return t * (rng.lognormvariate(0.0, self.noise) if self.noise > 0 else 1.0)


@dataclass
class _SimRequest:
    request_id: str
    gen_len: int
    block: int
    pos: int = 0  # committed prefix of the canvas (chunks are stored in order)
    chunk: int = 0  # size of the chunk in progress, 0 if none
    schedule: list[int] = field(default_factory=list)  # commits left, one entry per step
    last_chunk: int = 0
    pending_store: int = 0  # rows of the chunk finished last step, stored this step
    prefill: int = 0  # prompt tokens still to prefill (one piece, before decoding)
    tau: "TauTable | None" = None  # this request's commit table

    def max_chunk(self) -> int:
        block_end = (self.pos // self.block + 1) * self.block
        return min(block_end, self.gen_len) - self.pos


@dataclass(frozen=True)
class SimConfig:
    num_requests: int
    block_size: int = 32
    gen_len: int = 128
    prompt_len: int = 0
    steps: int = 300
    warmup_steps: int = 100
    token_budget: int = 1 << 20
    seed: int = 0


class ChunkChoice(NamedTuple):
    request: str
    size: int
    max_chunk: int
    block_start: bool  # the chunk starts a block: nothing but the policy limits its size


@dataclass(frozen=True)
class SimResult:
    committed: int  # tokens committed after warmup
    seconds: float  # simulated time after warmup
    steps: int
    mean_step_tokens: float
    chunk_choices: tuple[ChunkChoice, ...]  # every chunk started after warmup, in order

    @property
    def throughput(self) -> float:
        return self.committed / self.seconds if self.seconds > 0 else 0.0

    def size_histogram(self) -> dict[int, int]:
        return dict(sorted(Counter(ch.size for ch in self.chunk_choices).items()))


class Simulator:
    def __init__(self, policy: ChunkPolicy, config: SimConfig, tau: TauTable | tuple[TauTable, ...],
                 device: KneeDevice) -> None:
        self.policy, self.config, self.device = policy, config, device
        self.tables = tau if isinstance(tau, tuple) else (tau,)
        self.rng = random.Random(config.seed)
        self.table_rng = random.Random(f"tables-{config.seed}")
        self._ids = itertools.count()
        blocks = max(1, config.gen_len // config.block_size)
        # Staggered start (random block offsets) so requests do not finish in lockstep.
        self.requests = [self._new(self.rng.randrange(blocks) * config.block_size, prefill=False)
                         for _ in range(config.num_requests)]

    def _new(self, pos: int = 0, prefill: bool = True) -> _SimRequest:
        c = self.config
        return _SimRequest(f"r{next(self._ids)}", c.gen_len, c.block_size, pos=pos,
                           prefill=c.prompt_len if prefill else 0, tau=self._table())

    def _table(self) -> TauTable:
        # Its own stream: every policy meets the same sequence of request kinds.
        return self.tables[0] if len(self.tables) == 1 else self.table_rng.choice(self.tables)

    def step(self, record: list | None) -> tuple[int, float, int]:
        """One step; returns (tokens, seconds, committed)."""
        decoding = [r for r in self.requests if r.prefill == 0]
        fixed = sum(r.pending_store for r in decoding) + sum(r.prefill for r in self.requests)
        caps = [r.max_chunk() for r in decoding]
        views = tuple(RequestView(r.request_id, cap, r.block, r.chunk or r.last_chunk or None, None, r.gen_len - r.pos)
                      for r, cap in zip(decoding, caps))
        chosen = self.policy.choose(StepView(views, fixed, max(self.config.token_budget, len(views))))
        tokens = fixed
        for r, c, cap in zip(decoding, chosen, caps):
            if r.chunk == 0:
                r.chunk = max(1, min(int(c), cap))
                if record is not None:
                    record.append(ChunkChoice(r.request_id, r.chunk, cap, r.pos % r.block == 0))
                r.schedule = r.tau.schedule(r.chunk, self.rng)
            tokens += r.chunk
        seconds = self.device.step_seconds(tokens, self.rng)
        sizes = tuple(r.chunk for r in decoding)
        open_ = tuple(sum(r.schedule) for r in decoding)  # masked positions in each window
        committed = [self._advance(r) for r in decoding]
        for r in self.requests:
            r.prefill = 0  # one piece per prompt: it decodes from the next step on
        self.policy.observe(StepFeedback(tokens, seconds, sizes, tuple(committed),
                                         tuple(r.request_id for r in decoding), open_positions=open_))
        self.requests = [r for r in self.requests if r.pos < r.gen_len]
        self.requests += [self._new() for _ in range(self.config.num_requests - len(self.requests))]
        return tokens, seconds, sum(committed)

    @staticmethod
    def _advance(r: _SimRequest) -> int:
        r.pending_store = 0
        k = r.schedule.pop(0)
        if not r.schedule:  # chunk complete: stored next step, the cursor moves on
            r.pending_store, r.pos, r.last_chunk, r.chunk = r.chunk, r.pos + r.chunk, r.chunk, 0
        return k

    def run(self) -> SimResult:
        c = self.config
        for _ in range(c.warmup_steps):
            self.step(None)
        record: list = []
        totals = np.zeros(3)
        for _ in range(c.steps):
            totals += self.step(record)
        return SimResult(int(totals[2]), float(totals[1]), c.steps, float(totals[0]) / c.steps, tuple(record))


def simulate(policy: ChunkPolicy, config: SimConfig, tau: TauTable | tuple[TauTable, ...] | None = None,
             device: KneeDevice | None = None) -> SimResult:
    return Simulator(policy, config, tau or TauTable(CONCAVE_TAU), device or KneeDevice()).run()


def sweep(factories: dict[str, Callable[[], ChunkPolicy]], loads: tuple[int, ...], **kw) -> dict[str, dict[int, SimResult]]:
    """Each policy (a fresh one per load) at each constant load; ``kw`` go to SimConfig /
    ``simulate`` (``tau=``, ``device=``)."""
    tau, device = kw.pop("tau", None), kw.pop("device", None)
    return {name: {n: simulate(make(), SimConfig(num_requests=n, **kw), tau, device) for n in loads}
            for name, make in factories.items()}
