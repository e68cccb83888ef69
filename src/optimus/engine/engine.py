"""The synchronous engine: one ``step()`` = schedule -> execute -> postprocess.

The parts (scheduler, runner, policy, KV pages) come finished from ``builder.build_parts``;
committing and reporting live in ``postprocess.Postprocessor``. What stays here is the step
itself, including its overlap: a causal greedy step is launched before the previous one is read.
"""

from __future__ import annotations

import gc

import logging
import time
from dataclasses import dataclass, replace

import torch

from optimus.config import EngineConfig
from optimus.core.outputs import RequestOutput
from optimus.core.params import SamplingParams
from optimus.core.plan import StepPlan
from optimus.core.request import Geometry, Request, RequestState, check_request
from optimus.decoding.rules import CommitRule
from optimus.engine.builder import build_parts
from optimus.engine.postprocess import Postprocessor
from optimus.engine.stats import EngineStats
from optimus.executor.runner import GreedyPick, LogitRequest
from optimus.models.spec import AttentionKind

log = logging.getLogger(__name__)

MAX_STEP_GAP_S = 1.0  # a longer gap between steps is the engine waiting for work, not overhead


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
    device_time: "DeviceTime"  # its forward and pick, timed on the device
    after: "DeviceTime | None" = None  # the step launched just before it (the device ran it first)
    assumed: bool = False  # its commits were assumed at launch (overlap); tokens read later
    pipelined: bool = False  # left in flight while the next step ran other requests (pipeline)

    def request_ids(self) -> frozenset[str]:
        return frozenset(w.request.request_id for w in self.plan.works)


class DeviceTime:
    """A step's time on the device: CUDA events around its forward and pick (stream order, so
    the time the device spent queued behind the previous step is not in it). On a CPU the
    forward runs inside the launch, and the launch's host time is the step's time."""

    def __init__(self, device: torch.device) -> None:
        self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) \
            if device.type == "cuda" else None
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

    def gap_after(self, earlier: "DeviceTime") -> float | None:
        """Device idle time from ``earlier``'s end to this step's start (None on a CPU)."""
        if self._events is None or earlier._events is None:
            return None
        return max(0.0, earlier._events[1].elapsed_time(self._events[0]) / 1e3)


def _release(engine: "Engine") -> None:
    """Drop the KV cache, CUDA graphs and the parts holding them (the model stays loaded), so a
    next engine in this process sizes its cache from all the free memory."""
    engine.runner = engine.storage = engine.allocator = engine.policy = engine.scheduler = engine.post = None
    engine._in_flight = None
    gc.collect()  # the parts reference each other
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()


class Engine:
    def __init__(self, config: EngineConfig, loaded=None, commit_rule: CommitRule | None = None) -> None:
        parts = build_parts(config, loaded, commit_rule)
        self.config, self.loaded, self.device = config, parts.loaded, parts.device
        self.spec, self.tokenizer, self.block_size = parts.spec, parts.loaded.tokenizer, parts.block_size
        self.allocator, self.storage, self.runner = parts.allocator, parts.storage, parts.runner
        self.policy, self.scheduler = parts.policy, parts.scheduler
        self.parallel = parts.parallel  # tensor-parallel workers, or None
        self.post = Postprocessor(self.spec, self.tokenizer, parts.commit_rule, self.runner, self.scheduler,
                                  fail=self._fail)
        self.stats = EngineStats()
        self.max_model_len = self.spec.arch.max_position
        self._requests: dict[str, Request] = {}
        self._last_step_end: float | None = None  # perf_counter at the end of the latest step
        self._failed: list[Request] = []  # ended mid-step; reported at the end of the step
        self._in_flight: InFlight | None = None  # launched, tokens not read yet (overlap, pipeline)
        self._last_device_time: DeviceTime | None = None  # of the latest launched step
        self.pipeline_min_running = config.runner.pipeline_min_running  # benchmarks compare 0 (off)

    # ---- requests --------------------------------------------------------------------
    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> Geometry:
        """Raise ValueError (``field: why``) unless the request fits this model and cache.
        Reads only constants of the engine, so callers on other threads may use it."""
        refresh = None if self.scheduler.scheme.prefills else self.config.scheduler.max_tokens_per_step
        return check_request(self.spec, self.block_size, self.allocator, prompt_ids, params, refresh)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    group: str | None = None) -> Request:
        """``group``: requests sharing one (an API call's choices) are admitted fairly against
        other groups, so one caller's fan-out cannot starve the rest (``Scheduler``)."""
        if request_id in self._requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        geometry = self.check_request(prompt_ids, params)
        if params.seed is None and params.temperature > 0:
            params = replace(params, seed=self.config.seed + len(self._requests))
        request = Request(request_id, tuple(prompt_ids), params, geometry, self.spec.mask_id or 0,
                          group=group)
        self.scheduler.add(request)
        self._requests[request_id] = request
        self.stats.prompt_tokens += len(prompt_ids)
        return request

    def abort(self, request_id: str) -> RequestOutput | None:
        r = self.scheduler.abort(request_id)
        if r is None:
            return None
        r.stats.finish_time = time.monotonic()
        self._requests.pop(request_id, None)
        self.stats.refresh_gauges(self.scheduler, self.allocator)
        return self.post.output(r)

    def _fail(self, r: Request, exc: BaseException) -> None:
        """End one request with ``finish_reason="error"`` (reported at the end of the step);
        the engine goes on serving the others."""
        log.error("request %s failed: %s: %s; ending it", r.request_id, type(exc).__name__, exc,
                  exc_info=exc)
        if not r.is_done:
            self.scheduler.abort(r.request_id)
        r.finish_reason = "error"
        r.stats.finish_time = time.monotonic()
        self._requests.pop(r.request_id, None)
        self._failed.append(r)

    def recover(self, exc: BaseException) -> list[RequestOutput]:
        """After a step raised outside any one request's code: end every running request
        (their state may be half-updated) with ``finish_reason="error"``, drop the step in
        flight, and return the cache to a consistent state. Waiting requests are kept."""
        self._in_flight = None
        self.scheduler.discard_feedback()
        for r in list(self.scheduler.running):
            self._fail(r, exc)
        self.allocator.reclaim({p for r in self.scheduler.waiting for p in r.pages})
        self._last_step_end = None
        self.stats.refresh_gauges(self.scheduler, self.allocator)
        failed, self._failed = self._failed, []
        return [self.post.output(r) for r in failed]

    def has_work(self) -> bool:
        return self._in_flight is not None or self.scheduler.has_work()

    # ---- the step --------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Schedule, launch and complete one step; report what changed.

        Overlap (causal greedy decoding, ``runner.overlap``): a step whose commits do not
        depend on its tokens' values is only launched here. Its commits are assumed at once
        (one token per request), the next step is planned from them and launched with its
        input tokens read on the device, and only then does the host wait for, commit and
        report the earlier step; the host's work hides behind the GPU's. Outputs therefore
        lag the GPU by one step.

        Pipeline (diffusion greedy decoding, ``runner.pipeline_min_running``): a diffusion
        step's commits depend on its confidences, so none can be assumed. Instead, with many
        requests running, each step takes about half of them and is left in flight while the
        next step, planned over the other half, is launched behind it; then the host reads
        and commits the earlier one. The host's planning, commits and reports for one half
        hide behind the GPU's forward of the other.
        """
        c0 = time.perf_counter()
        previous, self._in_flight = self._in_flight, None
        busy = previous.request_ids() if previous is not None and previous.pipelined else frozenset()
        plan = self.scheduler.schedule(busy, self._decoder_cap())
        if not plan.works:
            if previous is None:
                self._last_step_end = None  # idle: the next gap is waiting, not overhead
                return []
            return self._complete(previous)
        t0 = time.perf_counter()
        schedule_s = t0 - c0
        flight = self._launch(plan, previous)
        outputs = self._complete(previous) if previous is not None else []
        if flight.pick is not None and self._may_overlap():
            self._assume_commits(flight)
            self._in_flight = flight
        elif flight.pick is not None and self._may_pipeline():
            flight.pipelined = True
            self._in_flight = flight
        else:
            outputs += self._complete(flight)
        self.stats.cpu_time_sum_s += schedule_s
        return outputs

    def _launch(self, plan, previous: InFlight | None) -> InFlight:
        t0 = time.perf_counter()
        overhead = self._overhead_before(t0)
        capture0 = self.runner.capture_s
        feed = None
        if previous is not None and previous.assumed:  # its tokens feed this step's first rows
            feed = previous.pick.feed(previous.wants, previous.plan)
        device_time = DeviceTime(self.device)
        hidden, wants = self.runner.run(plan, feed, on_built=device_time.start)
        pick = None
        if all(self.post.is_plain_greedy(plan.works[w.work_index].request) for w in wants):
            pick = self.runner.greedy(hidden)  # every logit row is greedy: one batched pass
        device_time.stop()
        f0 = time.perf_counter()
        self.scheduler.flush_feedback()  # the previous step's learning, while the GPU runs this one
        self.stats.cpu_time_sum_s += self.runner.last_build_s + time.perf_counter() - f0
        after, self._last_device_time = self._last_device_time, device_time
        return InFlight(plan, hidden, wants, pick, t0, overhead, captured=self.runner.capture_s > capture0,
                        device_time=device_time, after=after)

    def _may_pipeline(self) -> bool:
        """Whether diffusion steps take turns in halves (see step): enough requests run for
        the host's work on one half to matter beside the GPU's on the other."""
        least = self.pipeline_min_running
        return (least > 0 and self.spec.attention is not AttentionKind.CAUSAL
                and len(self.scheduler.running) >= least)

    def _decoder_cap(self) -> int | None:
        """Most decoding requests the next step plans: half of them while pipelining."""
        if not self._may_pipeline():
            return None
        decoding = sum(r.state is RequestState.DECODING for r in self.scheduler.running)
        return max(1, -(-decoding // 2))

    def _may_overlap(self) -> bool:
        """Whether a greedy step's commits are known before its tokens are: a causal model
        commits exactly the one position each decoding request predicts."""
        return self.config.runner.overlap and self.spec.attention is AttentionKind.CAUSAL

    def _assume_commits(self, flight: InFlight) -> None:
        """Mark the in-flight step's positions committed (tokens still on the device) and
        advance the cache cursors, so the next step can be planned before they are read."""
        for w in flight.wants:
            r = flight.plan.works[w.work_index].request
            if r.is_done:
                continue  # finished by the step before: this row is dropped when read
            r.committed[list(w.positions)] = True
            r.last_committed = len(w.positions)
        # Its latency is unknown yet: no evidence for the policy (a causal model has no choice).
        self.scheduler.complete_step(flight.plan, 0.0)
        flight.assumed = True

    def _complete(self, flight: InFlight) -> list[RequestOutput]:
        """Commit a launched step's tokens (waiting for them), then finish and report."""
        plan = flight.plan
        touched = {id(w.request): w.request for w in plan.works if not w.request.is_done}
        for r in touched.values():
            r.last_committed = 0
        self.post.commit_step(flight.plan, flight.hidden, flight.wants, flight.pick)
        t1 = time.perf_counter()
        start = flight.t_launch
        if flight.assumed:  # queued behind another step: it ran on the GPU from that one's end
            start = max(start, self._last_step_end or 0.0)
        latency = t1 - start
        overhead = flight.overhead
        if flight.pipelined:  # queued behind the other half's step: its own time is the device's
            latency = flight.device_time.seconds
            gap = flight.device_time.gap_after(flight.after) if flight.after is not None else None
            if gap is not None:  # the device idled this long waiting for the host
                overhead = gap if gap < MAX_STEP_GAP_S else 0.0
        self.stats.device_time_sum_s += flight.device_time.seconds
        if not flight.assumed:
            # A step that captured a CUDA graph paid a one-time cost: the policy learns no
            # latency from it (0 = no evidence). The host time around the step goes
            # separately, as a cost per step (folding it into the latency curve served
            # worse: docs/benchmarks.md).
            self.scheduler.complete_step(plan, 0.0 if flight.captured else latency, overhead)
        self._last_step_end = t1
        self.post.step_index += 1
        self.stats.record(plan, latency)
        outputs = []
        for r in touched.values():
            try:
                out = self.post.advance(r)
            except Exception as exc:  # detokenizing or stop checks of one request
                self._fail(r, exc)
                continue
            if r.is_done:
                self._requests.pop(r.request_id, None)
            if out is not None:
                outputs.append(out)
        outputs += [self.post.output(r) for r in self._failed]  # ended by this step's failures
        self._failed = []
        self.stats.cpu_time_sum_s += self.post.host_commit_s + time.perf_counter() - t1
        self.stats.graph_capture_s = self.runner.capture_s
        self.stats.refresh_gauges(self.scheduler, self.allocator)
        return outputs

    def use_policy(self, policy) -> None:
        """Swap the chunk policy between steps (benchmarks interleave policies on one engine);
        the last step's feedback goes to the policy that chose it."""
        self.scheduler.flush_feedback()
        self.scheduler.policy = self.policy = policy

    def close(self) -> None:
        """Stop tensor-parallel workers and give back device memory (see _release). Terminal."""
        if self.parallel is not None:
            self.parallel.stop()
        _release(self)

    def _overhead_before(self, t0: float) -> float:
        """Host time from the previous step's end to this forward (reporting it, serving,
        scheduling this one) when the steps ran back to back; 0 after idling."""
        if self._last_step_end is None or t0 - self._last_step_end >= MAX_STEP_GAP_S:
            return 0.0
        return t0 - self._last_step_end
