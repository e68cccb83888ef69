"""Engine-wide statistics, updated once per step."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field


@dataclass
class EngineStats:
    steps: int = 0
    tokens_computed: int = 0  # rows run through the model
    tokens_committed: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0  # answer tokens reported to callers
    chunk_size_counts: collections.Counter = field(default_factory=collections.Counter)
    committed_per_chunk: collections.Counter = field(default_factory=collections.Counter)
    last_step_latency_s: float = 0.0
    step_latency_sum_s: float = 0.0
    cpu_time_sum_s: float = 0.0  # scheduling + batch building + commit bookkeeping (host side)
    device_time_sum_s: float = 0.0  # steps' forwards and picks on the device (CUDA events; CPU: launches)
    steps_in_flight: int = 0  # steps left running while the next was planned (commits assumed, or halves)
    graph_capture_s: float = 0.0  # one-time CUDA-graph captures, inside the step latencies above
    refresh_tokens: int = 0  # rows of whole-sequence cache refreshes (dual / prefix cache)
    refresh_steps: int = 0  # steps holding at least one refresh
    refresh_step_latency_sum_s: float = 0.0  # their latency (they may hold other requests' windows too)
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    # When a list (benchmarks): one (rows, requests, refresh rows, latency s, device s) per
    # recorded step, what a CPU emulation of the device replays (bench offline's step_trace).
    trace: list | None = field(default=None, repr=False, compare=False)
    # Completed steps not recorded yet: (plan, latency, device s). Their requests keep
    # last_committed until then.
    _later: list = field(default_factory=list, repr=False, compare=False)

    def tau(self) -> dict[int, float]:
        """Mean tokens committed per step, by chunk size."""
        return {c: self.committed_per_chunk[c] / n for c, n in sorted(self.chunk_size_counts.items()) if n}

    @property
    def efficiency(self) -> float:
        return self.tokens_committed / self.tokens_computed if self.tokens_computed else 0.0

    def record(self, plan, latency: float, device_s: float = 0.0) -> None:
        """One completed step (``plan``: a StepPlan whose requests hold their commit counts)."""
        self.steps += 1
        self.last_step_latency_s = latency
        self.step_latency_sum_s += latency
        counts, committed_by_size = self.chunk_size_counts, self.committed_per_chunk
        computed = committed = refreshed = 0
        for w in plan.works:  # one pass per step
            n = w.end - w.start
            computed += n
            r = w.request
            r.stats.tokens_computed += n
            if w.refresh:
                refreshed += n
            if w.window is not None:
                c = w.window[1] - w.window[0]
                counts[c] += 1
                committed_by_size[c] += r.last_committed
                committed += r.last_committed
        self.tokens_computed += computed
        self.tokens_committed += committed
        if refreshed:
            self.refresh_tokens += refreshed
            self.refresh_steps += 1
            self.refresh_step_latency_sum_s += latency
        if self.trace is not None:
            self.trace.append((computed, len(plan.works), refreshed, latency, device_s))

    def record_later(self, plan, latency: float, device_s: float = 0.0) -> None:
        """Record a completed step at the next :meth:`catch_up` (the engine's next report, after
        the next launch), so its bookkeeping stays off the critical path."""
        self._later.append((plan, latency, device_s))

    def catch_up(self) -> None:
        for plan, latency, device_s in self._later:
            self.record(plan, latency, device_s)
        self._later.clear()

    def refresh_gauges(self, scheduler, allocator) -> None:
        self.running, self.waiting = len(scheduler.running), len(scheduler.waiting)
        self.kv_usage = allocator.used_pages / allocator.num_pages


@dataclass(frozen=True)
class EngineMetrics:
    """A snapshot of the engine for the server's gauges, counters and watchdog. Times are
    ``time.monotonic()`` (one clock for every process of the machine)."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    steps: int = 0
    tokens_computed: int = 0
    tokens_committed: int = 0
    chunk_size_counts: dict[int, int] = field(default_factory=dict)
    last_step_started: float | None = None  # None between steps
    last_step_latency_s: float = 0.0
    step_latency_sum_s: float = 0.0  # wall time of every step so far
    graph_capture_s: float = 0.0  # one-time CUDA-graph captures so far, inside the step times above
    device_time_sum_s: float = 0.0  # the steps' time on the device
    steps_in_flight: int = 0  # steps left running while the next was planned

    @classmethod
    def of(cls, stats: EngineStats, step_started: float | None) -> "EngineMetrics":
        return cls(stats.running, stats.waiting, stats.kv_usage, stats.steps, stats.tokens_computed,
                   stats.tokens_committed, dict(stats.chunk_size_counts), step_started,
                   stats.last_step_latency_s, stats.step_latency_sum_s, stats.graph_capture_s,
                   stats.device_time_sum_s, stats.steps_in_flight)
