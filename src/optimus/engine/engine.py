"""The synchronous engine: one ``step()`` = schedule -> execute -> postprocess.

The parts (scheduler, runner, policy, KV pages) come finished from ``builder.build_parts``;
committing and reporting live in ``postprocess.Postprocessor``. What stays here is the step
itself, including which launched steps stay in flight (``flight.FlightRules``).
"""

from __future__ import annotations

import functools
import gc
import logging
import operator
import time
from dataclasses import replace

import torch

from optimus.config import EngineConfig
from optimus.core.outputs import RequestOutput
from optimus.core.params import SamplingParams
from optimus.core.request import Geometry, Request, check_request
from optimus.decoding.rules import CommitRule
from optimus.engine.builder import build_parts
from optimus.engine.flight import DeviceTime, InFlight, host_gap
from optimus.engine.postprocess import Postprocessor
from optimus.engine.stats import EngineStats
from optimus.engine.emulated import emulate

log = logging.getLogger(__name__)
_REQUEST = operator.attrgetter("request")
_IS_DONE = operator.attrgetter("is_done")


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
        self.config, self.loaded, self.device, self.parallel = config, parts.loaded, parts.device, parts.parallel
        self.spec, self.tokenizer, self.block_size = parts.spec, parts.loaded.tokenizer, parts.block_size
        self.allocator, self.storage, self.runner = parts.allocator, parts.storage, parts.runner
        self.policy, self.scheduler, self.flights = parts.policy, parts.scheduler, parts.flights
        self.post = Postprocessor(self.spec, self.tokenizer, parts.commit_rule, self.runner, self.scheduler,
                                  fail=self._fail)
        self.stats, self.max_model_len = EngineStats(), self.spec.arch.max_position
        self._requests: dict[str, Request] = {}
        self._last_step_end: float | None = None  # perf_counter at the end of the latest step
        self._news: list[Request] = []  # settled or failed, not reported yet (see step)
        self._in_flight: InFlight | None = None  # launched, tokens not read yet (overlap, pipeline)
        self._last_device_time: DeviceTime | None = None  # of the latest launched step
        self.device_timer = functools.partial(DeviceTime, self.device)  # benchmarks may emulate the device
        self.emulated = emulate(self, config.emulate_device) if config.emulate_device else None

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
        self._news = [n for n in self._news if n is not r]  # its final output is this one
        self.stats.refresh_gauges(self.scheduler, self.allocator)
        self.post.account(self.stats)
        return self.post.output(r)

    def _fail(self, r: Request, exc: BaseException) -> None:
        """End one request with ``finish_reason="error"`` (reported with the step's news); the
        engine goes on serving the others."""
        log.error("request %s failed: %s: %s; ending it", r.request_id, type(exc).__name__, exc,
                  exc_info=exc)
        if not r.is_done:
            self.scheduler.abort(r.request_id)
        r.finish_reason = "error"
        r.stats.finish_time = time.monotonic()
        self._requests.pop(r.request_id, None)
        self._news.append(r)

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
        return self._report()

    def has_work(self) -> bool:
        return self._in_flight is not None or bool(self._news) or self.scheduler.has_work()

    # ---- the step --------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step, then report the previous one's news (the device runs
        this one meanwhile) and complete this one, or leave it in flight (``FlightRules``:
        overlap, pipeline; docs/architecture.md). Outputs come one step after their commits."""
        c0 = time.perf_counter()
        previous, self._in_flight = self._in_flight, None
        busy = previous.request_ids() if previous is not None and previous.pipelined else frozenset()
        plan = self.scheduler.schedule(busy, self.flights.decoder_cap(self.scheduler.running))
        if not plan.works:
            if previous is None:
                self._last_step_end = None  # idle: the next gap is waiting, not overhead
            else:
                self._complete(previous)
            return self._report()
        t0 = time.perf_counter()
        schedule_s = t0 - c0
        flight = self._launch(plan, previous)
        outputs = self._report()  # the last step's news, while the device runs this one
        if previous is not None:
            self._complete(previous)
            outputs += self._report()
        host_s = None if busy else flight.overhead + self.runner.last_build_s + self.post.host_commit_s
        keep = self.flights.keep(flight, len(self.scheduler.running), host_s)  # what whole steps cost the host
        if keep is None:
            self._complete(flight)  # its news goes out after the next launch
        else:
            if keep == "assume":
                flight.assume_commits(self.scheduler)
            flight.pipelined = keep == "pipeline"
            self._in_flight = flight
            self.stats.steps_in_flight += 1
        self.stats.cpu_time_sum_s += schedule_s
        return outputs

    def _launch(self, plan, previous: InFlight | None) -> InFlight:
        t0 = time.perf_counter()
        overhead = host_gap(self._last_step_end, t0)
        capture0 = self.runner.capture_s
        feed = None
        if previous is not None and previous.assumed:  # its tokens feed this step's first rows
            feed = previous.pick.feed(previous.wants, previous.plan)
        device_time = self.device_timer()
        hidden, wants = self.runner.run(plan, feed, on_built=device_time.start)
        pick = None
        if self.post.all_plain_greedy(map(_REQUEST, wants.works(plan))):
            pick = self.runner.greedy(hidden)  # every logit row is greedy: one batched pass
        device_time.stop()
        f0 = time.perf_counter()
        self.scheduler.learn_and_plan_ahead()  # while the GPU runs this step
        self.stats.cpu_time_sum_s += self.runner.last_build_s + time.perf_counter() - f0
        after, self._last_device_time = self._last_device_time, device_time
        return InFlight(plan, hidden, wants, pick, t0, overhead, captured=self.runner.capture_s > capture0,
                        device_time=device_time, after=after)

    def _complete(self, flight: InFlight) -> None:
        """Commit a launched step's tokens (waiting for them), then settle its requests: the
        finished ones end now, and the ones with news wait for ``_report``."""
        plan = flight.plan
        touched = list(dict.fromkeys(plan.requests()))  # each once (one work a request, as planned)
        self.post.commit_step(flight.plan, flight.hidden, flight.wants, flight.pick)
        t1 = time.perf_counter()
        # A step launched while another was in flight ran on the device from that one's end.
        start = max(flight.t_launch, self._last_step_end or 0.0)
        latency, overhead = t1 - start, flight.overhead
        device_s = flight.device_time.seconds
        if flight.pipelined:  # queued behind the other half's step: the device's own times
            latency, overhead = device_s, flight.idle_before(overhead)
        self.stats.device_time_sum_s += device_s
        # A graph capture is a one-time cost: no latency evidence (0). The host time around
        # the step is a separate cost per step (folded in, it served worse: docs/benchmarks.md).
        if not flight.assumed:
            self.scheduler.complete_step(plan, 0.0 if flight.captured else latency, overhead, device_s=device_s)
        elif flight.feedback is not None:  # held since its commits were assumed at launch
            self.scheduler.give_feedback(flight.feedback, 0.0 if flight.captured else latency, overhead, device_s)
        self._last_step_end = t1
        self.post.step_index += 1
        self.stats.record_later(plan, latency, device_s)  # with the next report, off the critical path
        held = plan.slots() if len(touched) == len(plan.works) and plan.canvases is self.scheduler.canvases else None
        news = self.post.settler.settle_all(touched, held)
        self._news += news
        for r in filter(_IS_DONE, news):
            self._requests.pop(r.request_id, None)
        self.stats.cpu_time_sum_s += self.post.host_commit_s + time.perf_counter() - t1
        self.stats.graph_capture_s = self.runner.capture_s
        self.stats.refresh_gauges(self.scheduler, self.allocator)

    def _report(self) -> list[RequestOutput]:
        """Outputs of the requests with news (each once), detokenized as the caller asked."""
        t0 = time.perf_counter()
        self.post.account(self.stats)
        news, self._news = self._news, []
        outputs = []
        for r in dict.fromkeys(news):  # each once, in order (requests hash by identity)
            try:
                outputs.append(self.post.output(r))
            except Exception as exc:  # detokenizing one request: it ends, reported without text
                self._fail(r, exc)
                self._news.remove(r)
                outputs.append(self.post.output(r, text=""))
        self.stats.cpu_time_sum_s += time.perf_counter() - t0
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
