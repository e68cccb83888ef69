"""Steps in flight: a launched step the host reads only after launching the next one.

``FlightRules`` decides which launched steps stay in flight (docs/architecture.md, "Launch and
completion"): a causal greedy step with its commits assumed (overlap), or a diffusion greedy
step over about half of the running requests while the next step runs the other half (pipeline),
when its ``PipelineRule`` says so: never, from N running requests on, or when the device's
latency curve says two half steps beat one whole step and the host's time between steps.
``InFlight`` is such a step; ``DeviceTime`` times it on the device.
"""

from __future__ import annotations

import time
import statistics
from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol

import torch

from optimus.config import check_pipeline
from optimus.core.plan import StepPlan
from optimus.core.request import RequestState
from optimus.policy import StepFeedback
from optimus.executor.logit_wants import LogitWants
from optimus.executor.runner import GreedyPick

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
    wants: LogitWants
    pick: GreedyPick | None
    t_launch: float  # perf_counter when the host started building it
    overhead: float  # host time between the previous step's end and this launch
    captured: bool  # its launch captured a CUDA graph (a one-time cost)
    device_time: DeviceTime  # its forward and pick, timed on the device
    after: DeviceTime | None = None  # the step launched just before it (the device ran it first)
    assumed: bool = False  # its commits were assumed at launch (overlap); tokens read later
    pipelined: bool = False  # left in flight while the next step ran other requests (pipeline)
    feedback: StepFeedback | None = None  # an assumed step's policy feedback, its latency known at completion

    def commits_certain(self) -> bool:
        """Every window predicts one open position: every rule commits exactly that one, so
        which positions commit is known before the tokens are read (a causal step always)."""
        return self.wants.rows == len(self.wants)  # one row per window, each window at least one

    def request_ids(self) -> frozenset[str]:
        return frozenset(w.request.request_id for w in self.plan.works)

    def assume_commits(self, scheduler) -> None:
        """Mark this step's positions committed (``commits_certain``; tokens still on the
        device) and advance the cache cursors, so the next step can be planned before they are
        read. Its policy feedback waits for its latency (``Scheduler.give_feedback``)."""
        for w in self.wants:
            r = self.plan.works[w.work_index].request
            if r.is_done:
                continue  # finished by the step before: this row is dropped when read
            r.committed[w.positions[0]] = True  # commits_certain: one position each
            r.last_committed, r.open_after = 1, 0
        self.feedback = scheduler.complete_step(self.plan, 0.0, hold=True)
        self.assumed = True

    def idle_before(self, host_overhead: float) -> float:
        """The overhead the policy learns for a step queued behind another: the device's idle
        time before it (the host's share that did not hide), or the host's gap where the device
        cannot tell (a CPU)."""
        gap = self.device_time.gap_after(self.after) if self.after is not None else None
        return host_overhead if gap is None else (gap if gap < MAX_STEP_GAP_S else 0.0)


class PipelineRule(Protocol):
    def pipelines(self, running: int) -> bool:
        """Whether the next steps should run the requests in two halves."""
        ...

    def observe(self, flight: InFlight, host_s: float | None, running: int) -> None:
        """A launched diffusion step, with the host's time before it when the steps before ran
        one at a time (None while pipelining: the host's work then hides), and the requests
        running."""
        ...


class NeverPipeline:
    def pipelines(self, running: int) -> bool:
        return False

    def observe(self, flight: InFlight, host_s: float | None, running: int) -> None:
        pass


@dataclass
class PipelineFrom:
    """From ``min_running`` running requests on (benchmarks and sweeps set it)."""

    min_running: int

    def pipelines(self, running: int) -> bool:
        return 0 < self.min_running <= running

    def observe(self, flight: InFlight, host_s: float | None, running: int) -> None:
        pass


@dataclass
class PipelineWhenItPays:
    """Two half steps (the host's work on one hidden behind the device's on the other, or
    the whole host's work if that is longer) against one whole step plus the host's critical
    time, predicted from ``step_seconds(tokens, requests)`` (the device's latency curve) and the
    decoding rows and host time per decoding request of recent whole steps. Half steps pay where
    a step's time grows with its tokens; where the curve is flat they cost as much as whole ones
    and the rule keeps off.

    Only whole steps show the host's time, so while it pipelines the rule runs one whole step in
    every ``probe_every``: without them an early, inflated estimate (the first steps of a run pay
    one-off costs) kept it pipelining where halves lose (an H200 sweep at 128 requests). Estimates
    are medians of the last ``window`` whole steps, so a few outliers do not move them."""

    step_seconds: Callable[[float, int], float]
    min_running: int = 16  # below this a step's host work is small anyway
    margin: float = 0.05  # halves must be predicted this much faster (no flapping at the boundary)
    min_steps: int = 8  # whole steps seen before the first decision
    window: int = 8
    probe_every: int = 16  # pipelined decisions between whole steps that re-measure the host
    tokens_seen: list[float] = field(default_factory=list)  # per decoding request, latest last
    host_seen: list[float] = field(default_factory=list)  # seconds of host critical time per decoding request
    steps_seen: int = 0
    pipelined_run: int = 0  # consecutive pipelined decisions

    @property
    def tokens_per_request(self) -> float | None:
        return statistics.median(self.tokens_seen) if self.tokens_seen else None

    @property
    def host_per_request(self) -> float | None:
        return statistics.median(self.host_seen) if self.host_seen else None

    def pipelines(self, running: int) -> bool:
        pays = self._pays(running)
        if pays and self.pipelined_run >= self.probe_every:
            pays = False  # a probe: whole, so the next step measures the host again
        self.pipelined_run = self.pipelined_run + 1 if pays else 0
        return pays

    def _pays(self, running: int) -> bool:
        if running < self.min_running or self.steps_seen < self.min_steps or self.host_per_request is None:
            return False
        n, host = running * self.tokens_per_request, running * self.host_per_request
        whole = self.step_seconds(n, running) + host
        halves = max(2 * self.step_seconds(n / 2, max(1, running // 2)), host)
        return halves < (1 - self.margin) * whole

    def observe(self, flight: InFlight, host_s: float | None, running: int) -> None:
        """Learns from whole steps with most running requests decoding: a half step's gap is not
        host work, and a policy may size chunks by load (elastic widens them when few requests
        decode, as while prompts are still prefilling), which would make whole steps at full load
        look larger than they are."""
        decoding = [w for w in flight.plan.works if w.window is not None]  # prompts' prefill pieces aside
        if host_s is None or len(decoding) < 0.75 * running:
            return
        self.steps_seen += 1
        decoders = len(decoding)
        self._remember(self.tokens_seen, sum(w.end - w.start for w in decoding) / decoders)
        if host_s > 0:
            self._remember(self.host_seen, host_s / decoders)

    def _remember(self, seen: list[float], value: float) -> None:
        seen.append(value)
        del seen[:-self.window]


def pipeline_rule(text: str, step_seconds: Callable[[float, int], float] | None = None) -> PipelineRule:
    """``runner.pipeline``: off | auto (needs the latency curve) | N (from N running requests on)."""
    if text == "off":
        return NeverPipeline()
    if text == "auto":
        if step_seconds is None:
            raise ValueError("pipeline: auto needs the device's latency curve")
        return PipelineWhenItPays(step_seconds)
    check_pipeline(text)
    return PipelineFrom(int(text))


@dataclass
class FlightRules:
    """Which launched steps stay in flight. Benchmarks swap ``pipeline`` between runs to
    compare rules on one engine."""

    causal: bool  # the model predicts one position per step (its commits can be assumed)
    overlap: bool  # runner.overlap: keep greedy steps whose commits are certain in flight
    pipeline: PipelineRule  # runner.pipeline: when diffusion steps run in halves
    overlap_diffusion: bool = False  # diffusion steps too, when commits_certain (prefix-block caches)
    assumed_last: bool = False  # the latest kept step was whole with its commits assumed

    def keep(self, flight: InFlight, running: int, host_s: float | None = None) -> Literal["assume", "pipeline"] | None:
        """'assume' (overlap: commits certain), 'pipeline', or None: complete it now. Only
        all-greedy steps (picked on the device at launch) can wait. ``host_s``: the host's
        critical time before this launch when the step before ran whole (None when it was a
        half in flight)."""
        if not self.causal:
            self.pipeline.observe(flight, host_s, running)
        if flight.pick is None:
            keep = None
        elif self.causal:
            keep = "assume" if self.overlap else None
        elif self.overlaps_unit_steps and flight.commits_certain():
            keep = "assume"  # hides the host as halves would, without their second pass: a half ends them
        elif self.pipelines(running):  # halves take turns: a half kept whole would plan the same half again
            keep = "pipeline"
        else:
            keep = None
        self.assumed_last = keep == "assume"
        return keep

    @property
    def overlaps_unit_steps(self) -> bool:
        """Diffusion steps whose windows all hold one open position stay in flight (assumed)
        while the next step is planned, halves running or not."""
        return not self.causal and self.overlap and self.overlap_diffusion

    def pipelines(self, running: int) -> bool:
        """Halves, unless whole steps are being assumed: their host work hides already, and a
        whole step does not pay the halves' second pass over a flat latency curve."""
        return not self.causal and not self.assumed_last and self.pipeline.pipelines(running)

    def decoder_cap(self, running) -> int | None:
        """Most decoding requests the next step plans: half of them while pipelining."""
        if not self.pipelines(len(running)):
            return None
        decoding = sum(r.state is RequestState.DECODING for r in running)
        return max(1, -(-decoding // 2))
