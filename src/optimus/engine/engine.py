"""The synchronous engine: one ``step()`` = schedule, forward, commit, report."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from optimus.config import EngineConfig
from optimus.engine.decoding import GREEDY_TEMPERATURE, commit_rule_for, propose
from optimus.engine.detokenizer import IncrementalDetokenizer
from optimus.engine.kv_cache import KVCacheStorage, PageAllocator, capacity_in_pages
from optimus.engine.outputs import CommitEvent, RequestOutput
from optimus.engine.params import SamplingParams
from optimus.engine.policies import make_policy
from optimus.engine.request import Geometry, Request, RequestState
from optimus.engine.runner import GreedyPick, LogitRequest, ModelRunner
from optimus.engine.scheduler import RequestWork, Scheduler, StepPlan
from optimus.engine.stats import EngineStats
from optimus.models.spec import AttentionKind, ModelSpec

log = logging.getLogger(__name__)

MAX_STEP_GAP_S = 1.0  # a longer gap between steps is the engine waiting for work, not overhead


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_geometry(spec: ModelSpec, block_size: int, prompt_len: int, max_tokens: int) -> Geometry:
    causal = spec.attention is AttentionKind.CAUSAL
    shift = 1 if (spec.logit_shift or causal) else 0
    if causal:
        block_size, origin = 1, 0
    elif spec.attention is AttentionKind.BLOCK_CAUSAL:
        origin = 0  # SDAR aligns blocks to absolute position 0
    else:
        origin = prompt_len  # LLaDA/Dream: blocks start where the answer starts
    if shift:
        prefill = prompt_len - 1
    elif spec.attention is AttentionKind.BLOCK_CAUSAL:
        prefill = (prompt_len // block_size) * block_size  # the tail shares the first decode block
    else:
        prefill = prompt_len
    end = prompt_len + max_tokens
    canvas_end = origin + -(-(end - origin) // block_size) * block_size
    return Geometry(block_size, origin, shift, prefill, prompt_len, canvas_end)


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
    assumed: bool = False  # its commits were assumed at launch (overlap); tokens read later


class Engine:
    def __init__(self, config: EngineConfig, loaded=None, commit_rule=None) -> None:
        self.config = config
        self.commit_rule = commit_rule or commit_rule_for(config)  # (conf, params, chunk) -> indices
        self.device = resolve_device(config.model.device)
        if loaded is None:
            from optimus.loader import load_model
            loaded = load_model(config.model.model, dtype=config.model.dtype, device=str(self.device))
        self.loaded = loaded
        loaded.model.fuse_projections()  # q/k/v and gate/up as one matmul each (views, no copy)
        self.spec: ModelSpec = self.loaded.spec
        self.tokenizer = self.loaded.tokenizer
        self.block_size = self._block_size()
        model = self.loaded.model
        dtype = next(model.parameters()).dtype
        cache = config.cache
        num_pages = cache.num_pages or capacity_in_pages(self.spec.arch, cache.page_size, dtype, self.device,
                                                         cache.memory_fraction)
        self.allocator = PageAllocator(num_pages, cache.page_size)
        self.storage = KVCacheStorage(self.spec.arch, num_pages, cache.page_size, dtype, self.device)
        self.runner = ModelRunner(model, self.storage, cache.page_size, self.device,
                                  config.runner.attention_backend, self._graphs(model, num_pages))
        self.policy = make_policy(config.scheduler.policy, **self._policy_kwargs())
        self.scheduler = Scheduler(config.scheduler, self.allocator, self.policy, self.spec.attention)
        self.stats = EngineStats()
        self.max_model_len = self.spec.arch.max_position
        self._requests: dict[str, Request] = {}
        self._step = 0
        self._host_commit_s = 0.0
        self._last_step_end: float | None = None  # perf_counter at the end of the latest step
        self._failed: list[Request] = []  # aborted mid-step; reported at the end of the step
        self._in_flight: InFlight | None = None  # launched, commits assumed, tokens not read yet
        self.stream_text = True  # detokenize every output (servers); offline use turns it off

    def _graphs(self, model, num_pages: int):
        rc = self.config.runner
        if not (rc.cuda_graphs and self.device.type == "cuda"):
            return None
        from optimus.engine.cuda_graphs import GraphedBody
        max_pages = min(num_pages, -(-self.spec.arch.max_position // self.config.cache.page_size))
        graphs = GraphedBody(model, self.storage, rc.attention_backend, rc.graph_max_tokens,
                             self.config.scheduler.max_running, max_pages)
        if rc.graph_precapture:
            # A decoding request runs at most a stored block plus a window (two blocks of rows);
            # a causal one, its one new token.
            causal = self.spec.attention is AttentionKind.CAUSAL
            keys = graphs.decode_keys(1 if causal else 2 * self._block_size())
            log.info("capturing %d CUDA graphs", len(keys))
            with tqdm(total=len(keys), desc="CUDA graphs", unit="graph", leave=False) as bar:
                graphs.precapture(keys, progress=lambda key: bar.update())
        return graphs

    def _block_size(self) -> int:
        if self.spec.attention is AttentionKind.BLOCK_CAUSAL:
            return self.spec.block_size
        return self.config.scheduler.block_size or self.spec.block_size or 32

    def _policy_kwargs(self) -> dict:
        if not self.config.scheduler.policy.startswith("elastic"):
            return {}
        from optimus.engine.elastic_setup import elastic_kwargs
        return elastic_kwargs(self)

    # ---- requests --------------------------------------------------------------------
    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> Geometry:
        """Raise ValueError (``field: why``) unless the request fits this model and cache.
        Reads only constants of the engine, so callers on other threads may use it."""
        if not prompt_ids:
            raise ValueError("prompt: is empty: give at least one token")
        vocab = self.spec.arch.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt: token id {bad} is outside the vocabulary [0, {vocab})")
        bad = next((t for t in params.stop_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"stop_token_ids: token id {bad} is outside the vocabulary [0, {vocab})")
        geometry = make_geometry(self.spec, self.block_size, len(prompt_ids), params.max_tokens)
        if geometry.canvas_end > self.max_model_len:
            raise ValueError(f"max_tokens: prompt ({len(prompt_ids)} tokens) plus max_tokens "
                             f"({params.max_tokens}) exceeds the model's context length of "
                             f"{self.max_model_len} tokens")
        if self.allocator.pages_for(geometry.canvas_end) > self.allocator.num_pages:
            raise ValueError(f"max_tokens: the request needs {geometry.canvas_end} tokens of KV cache; "
                             f"the cache holds {self.allocator.num_pages * self.allocator.page_size}")
        return geometry

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    group: str | None = None) -> Request:
        """``group``: requests sharing one (an API call's choices) are admitted fairly against
        other groups, so one caller's fan-out cannot starve the rest (``Scheduler``)."""
        if request_id in self._requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        geometry = self.check_request(prompt_ids, params)
        if params.seed is None and params.temperature > 0:
            params = _with_seed(params, self.config.seed + len(self._requests))
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
        self._refresh_gauges()
        return self._output(r)

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
        self._refresh_gauges()
        failed, self._failed = self._failed, []
        return [self._output(r) for r in failed]

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
        """
        c0 = time.perf_counter()
        plan = self.scheduler.schedule()
        previous, self._in_flight = self._in_flight, None
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
        else:
            outputs += self._complete(flight)
        self.stats.cpu_time_sum_s += schedule_s
        return outputs

    def _launch(self, plan, previous: InFlight | None) -> InFlight:
        t0 = time.perf_counter()
        overhead = self._overhead_before(t0)
        capture0 = self.runner.capture_s
        feed = previous.pick.feed(previous.wants, previous.plan) if previous is not None else None
        hidden, wants = self.runner.run(plan, feed)
        pick = None
        if all(self._is_plain_greedy(plan.works[w.work_index].request) for w in wants):
            pick = self.runner.greedy(hidden)  # every logit row is greedy: one batched pass
        f0 = time.perf_counter()
        self.scheduler.flush_feedback()  # the previous step's learning, while the GPU runs this one
        self.stats.cpu_time_sum_s += self.runner.last_build_s + time.perf_counter() - f0
        return InFlight(plan, hidden, wants, pick, t0, overhead, captured=self.runner.capture_s > capture0)

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
        self._propose_and_commit(flight)
        t1 = time.perf_counter()
        start = flight.t_launch
        if flight.assumed:  # queued behind another step: it ran on the GPU from that one's end
            start = max(start, self._last_step_end or 0.0)
        latency = t1 - start
        if not flight.assumed:
            # A step that captured a CUDA graph paid a one-time cost: the policy learns no
            # latency from it (0 = no evidence). The host time around the step goes
            # separately, as a cost per step (folding it into the latency curve served
            # worse: docs/benchmarks.md).
            self.scheduler.complete_step(plan, 0.0 if flight.captured else latency, flight.overhead)
        self._last_step_end = t1
        self._record(plan, latency)
        outputs = [self._output(r) for r in self._failed]
        self._failed = []
        for r in touched.values():
            try:
                out = self._advance(r)
            except Exception as exc:  # detokenizing or stop checks of one request
                self._fail(r, exc)
                out = self._output(self._failed.pop())
            if out is not None:
                outputs.append(out)
        self.stats.cpu_time_sum_s += self._host_commit_s + time.perf_counter() - t1
        self.stats.graph_capture_s = self.runner.capture_s
        self._refresh_gauges()
        return outputs

    def use_policy(self, policy) -> None:
        """Swap the chunk policy between steps (benchmarks interleave policies on one engine);
        the last step's feedback goes to the policy that chose it."""
        self.scheduler.flush_feedback()
        self.scheduler.policy = self.policy = policy

    def _overhead_before(self, t0: float) -> float:
        """Host time from the previous step's end to this forward (reporting it, serving,
        scheduling this one) when the steps ran back to back; 0 after idling."""
        if self._last_step_end is None or t0 - self._last_step_end >= MAX_STEP_GAP_S:
            return 0.0
        return t0 - self._last_step_end

    def _propose_and_commit(self, flight: InFlight) -> None:
        """Greedy requests share one batched LM-head pass; sampled or constrained ones go alone."""
        plan, hidden, wants = flight.plan, flight.hidden, flight.wants
        fast, slow = [], []
        for w in wants:
            r = plan.works[w.work_index].request
            if not r.is_done:  # finished or aborted while the step was in flight: drop its rows
                (fast if self._is_plain_greedy(r) else slow).append(w)
        h0 = time.perf_counter()
        if fast:
            if flight.pick is not None:  # every logit row was picked at launch, in row order
                tokens, conf = flight.pick.read()
                first = [w.offset for w in fast]
            else:  # greedy rows among sampled ones: gather them, pick them now
                index = np.concatenate([np.arange(w.offset, w.offset + len(w.positions)) for w in fast])
                tokens, conf = self.runner.greedy(hidden[torch.from_numpy(index).to(hidden.device)]).read()
                first = np.cumsum([0] + [len(w.positions) for w in fast])[:-1].tolist()
            h0 = time.perf_counter()
            token_list = tokens.tolist()
            for w, i in zip(fast, first):
                n = len(w.positions)
                self._guarded_commit(plan.works[w.work_index], w.positions, token_list[i:i + n],
                                     conf[i:i + n])
        self._host_commit_s = time.perf_counter() - h0
        for w in slow:
            r = plan.works[w.work_index].request
            try:
                logits = self._constrain(r, w.positions,
                                         self.runner.logits(hidden[w.offset:w.offset + len(w.positions)]))
                tokens, conf = propose(logits, r.params, r.generator)
            except Exception as exc:  # one request's numerics or parameters never stop the engine
                self._fail(r, exc)
                continue
            self._guarded_commit(plan.works[w.work_index], w.positions, tokens.tolist(), conf.cpu())

    def _guarded_commit(self, work: RequestWork, positions: tuple[int, ...], tokens: list[int],
                        conf: torch.Tensor) -> None:
        try:
            self._commit(work, positions, tokens, conf)
        except Exception as exc:
            self._fail(work.request, exc)

    def _is_plain_greedy(self, r: Request) -> bool:
        return r.params.temperature <= GREEDY_TEMPERATURE and not self._suppressed_ids(r)

    def _constrain(self, r: Request, positions: tuple[int, ...], logits: torch.Tensor) -> torch.Tensor:
        """min_tokens: end-of-answer ids are impossible before the answer is long enough."""
        suppress = self._suppressed_ids(r)
        start = r.geometry.canvas_start
        early = [i for i, q in enumerate(positions) if q - start < r.params.min_tokens]
        if suppress and early:
            logits[torch.tensor(early, device=logits.device)[:, None],
                   torch.tensor(suppress, device=logits.device)] = float("-inf")
        return logits

    def _commit(self, work: RequestWork, positions: tuple[int, ...], tokens: list[int],
                conf: torch.Tensor) -> None:
        r = work.request
        start = r.geometry.canvas_start
        if len(positions) == 1:
            chosen = [0]  # every rule commits at least one position: no choice to make
        else:
            chosen = self.commit_rule(conf, r.params, work.window[1] - work.window[0]).tolist()
        committed_pos, committed_tok = [], []
        for i in sorted(chosen):
            pos = positions[i]
            r.tokens[pos], r.committed[pos] = tokens[i], True
            committed_pos.append(pos - start)
            committed_tok.append(tokens[i])
        r.last_committed = len(chosen)
        r.stats.steps += 1
        r.stats.tokens_committed += len(chosen)
        c = work.window[1] - work.window[0]
        r.stats.chunk_sizes[c] = r.stats.chunk_sizes.get(c, 0) + 1
        r.stats.committed_per_chunk[c] = r.stats.committed_per_chunk.get(c, 0) + len(chosen)
        r.events.append(CommitEvent(self._step, work.window[0] - start, work.window[1] - start,
                                    tuple(committed_pos), tuple(committed_tok)))

    def _suppressed_ids(self, r: Request) -> list[int]:
        if r.params.min_tokens == 0:
            return []
        return sorted(set(self.spec.eos_ids) | set(r.params.stop_token_ids))

    def _record(self, plan, latency: float) -> None:
        s = self.stats
        self._step += 1
        s.steps += 1
        s.last_step_latency_s = latency
        s.step_latency_sum_s += latency
        for w in plan.works:
            s.tokens_computed += w.end - w.start
            w.request.stats.tokens_computed += w.end - w.start
            if w.window is not None:
                c = w.window[1] - w.window[0]
                s.chunk_size_counts[c] += 1
                s.committed_per_chunk[c] += w.request.last_committed
                s.tokens_committed += w.request.last_committed

    def _refresh_gauges(self) -> None:
        s = self.stats
        s.running, s.waiting = len(self.scheduler.running), len(self.scheduler.waiting)
        s.kv_usage = self.allocator.used_pages / self.allocator.num_pages

    # ---- finishing and reporting -----------------------------------------------------
    def _advance(self, r: Request) -> RequestOutput | None:
        if r.is_done:
            return None
        n = min(r.contiguous_answer_len(), r.params.max_tokens)
        reason, keep = self._finish_reason(r, n)
        if reason is None and n == r.output_len and not r.events:
            return None
        if n > 0 and r.stats.first_token_time is None:
            r.stats.first_token_time = time.monotonic()
        r.output_len = keep if reason else n
        if reason is not None:
            r.stats.finish_time = time.monotonic()
            self.scheduler.finish(r, reason)
            self._requests.pop(r.request_id, None)
        return self._output(r)

    def _finish_reason(self, r: Request, n: int) -> tuple[str | None, int]:
        """Over the contiguous answer of ``n`` tokens -> (reason or None, tokens to keep).
        Only the tokens not scanned before are read (stop ids), so a step costs O(new)."""
        p = r.params
        start = r.geometry.canvas_start
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.spec.eos_ids))
        first = max(r.stop_scanned, p.min_tokens)
        if stop_ids and first < n:
            new = r.tokens[start + first:start + n].tolist()
            for i, token in enumerate(new, first):
                if token in stop_ids:
                    return "stop", i  # the stop token itself is not part of the answer
        r.stop_scanned = max(r.stop_scanned, n)
        if p.stop:
            text = self._text(r, r.tokens[start:start + n].tolist())
            cut = _first_stop(text, p.stop)
            if cut is not None:
                r.done_text = text[:cut]
                return "stop", n
        if n >= p.max_tokens:
            return "length", n
        return None, n

    def _text(self, r: Request, ids: list[int]) -> str:
        if r.detokenizer is None:
            r.detokenizer = IncrementalDetokenizer(self.tokenizer, r.params.skip_special_tokens)
        return r.detokenizer.finish(ids) if r.is_done else r.detokenizer.update(ids)

    def _output(self, r: Request) -> RequestOutput:
        start = r.geometry.canvas_start
        ids = tuple(r.tokens[start:start + r.output_len].tolist())
        if r.done_text:
            text = r.done_text
        elif not r.is_done and not self.stream_text:
            text = ""  # offline callers read text once, when the request finishes
        elif r.is_done and r.detokenizer is None:
            text = self.tokenizer.decode(list(ids), skip_special_tokens=r.params.skip_special_tokens)
        else:
            text = self._text(r, list(ids))
        if r.params.stop and not r.done_text and not r.is_done:
            text = _hold_back_stop_prefix(text, r.params.stop)
        events, r.events = tuple(r.events), []
        return RequestOutput(r.request_id, r.prompt_ids, ids, text, r.is_done, r.finish_reason,
                             r.stats, events)


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(cuts) if cuts else None


def _hold_back_stop_prefix(text: str, stops: tuple[str, ...]) -> str:
    """Withhold a tail that could still grow into a stop string, so streams never show it."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return text[:len(text) - hold] if hold else text


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    from dataclasses import replace
    return replace(params, seed=seed)
