"""Steps in flight: a launched step the host reads only after launching the next one.

``FlightRules`` decides which launched steps stay in flight (docs/architecture.md, "Launch and
completion"): a causal greedy step with its commits assumed (overlap), or, with many requests
running, a diffusion greedy step over about half of them while the next step runs the other
half (pipeline). ``InFlight`` is such a step; ``DeviceTime`` times it on the device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch

from optimus.core.plan import StepPlan
from optimus.core.request import RequestState
from optimus.executor.runner import GreedyPick, LogitRequest

MAX_STEP_GAP_S = 1.0  # a longer gap between steps is the engine waiting for work, not overhead


def host_gap(last_step_end: float | None, t0: float) -> float:
    """Host time from the previous step's end to this forward (reporting it, serving,
    scheduling this one) when the steps ran back to back; 0 after idling."""
    if last_step_end is None or t0 - last_step_end >= MAX_STEP_GAP_S:
        return 0.0
    return t0 - last_step_end


class DeviceTime:
    """A step's time on the device: CUDA events around its forward and pick (stream order, so
    the time the device spent queued behind the previous step is not in it). On a CPU the
    forward runs inside the launch, and the launch's host time is the step's time."""

    def __init__(self, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else None
        self._host_s = 0.0
        self._t0 = 0.0

    def start(self) -> None:
        if self._events is not None:
            self._events[0].record()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self._events is not None:
            self._events[1].record()
        self._host_s = time.perf_counter() - self._t0

    @property
    def seconds(self) -> float:
        """Only once the step's results were read (its end event has passed)."""
        if self._events is None:
            return self._host_s
        self._events[1].synchronize()
        return self._events[0].elapsed_time(self._events[1]) / 1e3

    def gap_after(self, earlier: DeviceTime) -> float | None:
        """Device idle time from ``earlier``'s end to this step's start (None on a CPU)."""
        if self._events is None or earlier._events is None:
            return None
        return max(0.0, earlier._events[1].elapsed_time(self._events[0]) / 1e3)


@dataclass
class InFlight:
    """A launched step: its plan, the hidden rows its logits need, and (when every logit
    row is greedy) the picks already queued on the device."""

    plan: StepPlan
    hidden: torch.Tensor  # [M, d]
    wants: list[LogitRequest]
    pick: GreedyPick | None
    t_launch: float  # perf_counter when the host started building it
    overhead: float  # host time between the previous step's end and this launch
    captured: bool  # its launch captured a CUDA graph (a one-time cost)
    device_time: DeviceTime  # its forward and pick, timed on the device
    after: DeviceTime | None = None  # the step launched just before it (the device ran it first)
    assumed: bool = False  # its commits were assumed at launch (overlap); tokens read later
    pipelined: bool = False  # left in flight while the next step ran other requests (pipeline)

    def request_ids(self) -> frozenset[str]:
        return frozenset(w.request.request_id for w in self.plan.works)

    def assume_commits(self, scheduler) -> None:
        """Mark this causal step's positions committed (tokens still on the device) and advance
        the cache cursors, so the next step can be planned before they are read."""
        for w in self.wants:
            r = self.plan.works[w.work_index].request
            if r.is_done:
                continue  # finished by the step before: this row is dropped when read
            r.committed[list(w.positions)] = True
            r.last_committed = len(w.positions)
        # Its latency is unknown yet: no evidence for the policy (a causal model has no choice).
        scheduler.complete_step(self.plan, 0.0)
        self.assumed = True

    def idle_before(self, host_overhead: float) -> float:
        """The overhead the policy learns for a step queued behind another: the device's idle
        time before it (the host's share that did not hide), or the host's gap where the device
        cannot tell (a CPU)."""
        gap = self.device_time.gap_after(self.after) if self.after is not None else None
        return host_overhead if gap is None else (gap if gap < MAX_STEP_GAP_S else 0.0)


@dataclass
class FlightRules:
    """Which launched steps stay in flight. Benchmarks change ``pipeline_min_running``
    between runs to compare the pipeline on and off on one engine."""

    causal: bool  # the model predicts one position per step (its commits can be assumed)
    overlap: bool  # runner.overlap: keep causal greedy steps in flight
    pipeline_min_running: int  # runner.pipeline_min_running: halves of diffusion steps (0 = never)

    def keep(self, flight: InFlight, running: int) -> Literal["assume", "pipeline"] | None:
        """'assume' (overlap), 'pipeline', or None: complete it now. Only all-greedy steps
        (picked on the device at launch) can wait."""
        if flight.pick is None:
            return None
        if self.causal:
            return "assume" if self.overlap else None
        return "pipeline" if self.pipelines(running) else None

    def pipelines(self, running: int) -> bool:
        """Enough requests run for the host's work on one half to matter beside the GPU's
        work on the other."""
        return not self.causal and 0 < self.pipeline_min_running <= running

    def decoder_cap(self, running) -> int | None:
        """Most decoding requests the next step plans: half of them while pipelining."""
        if not self.pipelines(len(running)):
            return None
        decoding = sum(r.state is RequestState.DECODING for r in running)
        return max(1, -(-decoding // 2))
