"""Pipelined diffusion decoding (``runner.pipeline``): with many requests running,
each step takes about half of them and stays in flight while the next step, over the other
half, is launched. Token for token it must equal the unpipelined engine, and no request may
sit in two steps at once (neither planned nor preempted while its step is in flight)."""

import random
from types import SimpleNamespace

import numpy as np
import pytest

from optimus.config import SchedulerConfig
from optimus.core.params import SamplingParams
from optimus.core.request import Request, RequestState, make_geometry
from optimus.engine.llm import LLM
from optimus.executor.logit_wants import LogitWants
from optimus.policy.fixed import FixedPolicy
from optimus.scheduler.pages import PageAllocator
from optimus.scheduler.scheduler import Scheduler
from fixtures.checkpoints import make_tiny_model
from fixtures.engine import tiny_loaded

OPTIONS = dict(device="cpu", num_pages=512, page_size=4, block_size=4)


@pytest.fixture(scope="module", params=["sdar", "llada", "dream"])
def loaded(request):
    return tiny_loaded(request.param)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 200) for _ in range(rng.randint(1, 9))] for _ in range(n)]


def _run(loaded, least: int, prompts, params, policy="fixed:4", watch=None):
    llm = LLM(loaded=loaded, policy=policy, pipeline=str(least or 'off'), **OPTIONS)
    engine = llm.engine
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, p)
    done = {}
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = (out.token_ids, out.finish_reason)
        if watch is not None:
            watch(engine)
    return [done[str(i)] for i in range(len(prompts))]


def test_pipelined_decoding_equals_unpipelined_with_stops_lengths_and_sampling(loaded):
    prompts = _prompts(7)
    free = _run(loaded, 0, prompts, [SamplingParams(max_tokens=12, ignore_eos=True)] * 7)
    params = [SamplingParams(max_tokens=12, stop_token_ids=(free[0][0][5],), ignore_eos=True),
              SamplingParams(max_tokens=1, ignore_eos=True),
              SamplingParams(max_tokens=12, stop_token_ids=(free[2][0][1],), ignore_eos=True),
              SamplingParams(max_tokens=7, temperature=0.9, seed=5, ignore_eos=True),  # sampled: not pipelined
              SamplingParams(max_tokens=9, ignore_eos=True),
              SamplingParams(max_tokens=12, ignore_eos=True),
              SamplingParams(max_tokens=5, ignore_eos=True)]
    plain = _run(loaded, 0, prompts, params)
    assert [reason for _, reason in plain][:3] == ["stop", "length", "stop"]
    pipelined = []

    def watch(engine):
        flight = engine._in_flight
        pipelined.append(flight is not None and flight.pipelined)

    assert _run(loaded, 2, prompts, params, watch=watch) == plain
    assert sum(pipelined) > 5  # the pipeline really ran


def test_steps_take_turns_in_halves_and_never_share_a_request(loaded):
    prompts = _prompts(8, seed=2)
    params = [SamplingParams(max_tokens=16, ignore_eos=True)] * 8
    plans = []
    llm = LLM(loaded=loaded, policy="fixed:2", pipeline="4", **OPTIONS)
    engine = llm.engine
    schedule = engine.scheduler.schedule

    def recording(busy=frozenset(), max_decoders=None):
        plan = schedule(busy, max_decoders)
        decoders = {w.request.request_id for w in plan.works if w.window is not None}
        in_flight = engine._in_flight  # the engine took it out before planning: it is `busy`
        plans.append((decoders, set(busy), max_decoders))
        assert in_flight is None
        return plan

    engine.scheduler.schedule = recording
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, p)
    while engine.has_work():
        engine.step()
    halves = [(d, busy, cap) for d, busy, cap in plans if cap is not None]
    assert len(halves) > 10
    for decoders, busy, cap in halves:
        assert not decoders & busy  # a request in flight is never planned again
        assert len(decoders) <= cap <= 4
    # Consecutive full-load steps alternate between the two halves.
    full = [d for d, busy, cap in halves if len(d) == 4 and busy]
    assert any(a.isdisjoint(b) for a, b in zip(full, full[1:]))


def test_an_abort_while_its_half_is_in_flight_leaves_the_others_exact(loaded):
    prompts = _prompts(6, seed=3)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    results = {}
    for least in (0, 2):
        engine = LLM(loaded=loaded, policy="fixed:4", pipeline=str(least or 'off'), **OPTIONS).engine
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, params)
        done, steps = {}, 0
        while engine.has_work():
            if steps == 4:
                assert engine.abort("1") is not None  # in the step in flight when pipelined
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = (out.token_ids, out.finish_reason)
            steps += 1
        assert engine.allocator.used_pages == 0
        results[least] = {k: v for k, v in done.items() if k != "1"}
    assert results[2] == results[0] and len(results[0]) == 5


# ---- the scheduler alone: two plans in flight under memory pressure ---------------------

def _request(rid, spec, prompt_len, max_tokens, block=4):
    g = make_geometry(spec, block, prompt_len, max_tokens)
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), g,
                   spec.mask_id or 0)


def _commit_some(plan, rng):
    for w in plan.works:
        r = w.request
        r.last_committed = 0
        if w.window is None or r.is_done:
            continue
        masked = [p for p in range(*w.window) if not r.committed[p]]
        for p in rng.sample(masked, rng.randint(1, len(masked))) if masked else []:
            r.committed[p], r.tokens[p] = True, 7
            r.last_committed += 1


def test_preemption_under_a_pipeline_never_takes_a_request_in_flight():
    spec = make_tiny_model("sdar")[1]
    alloc = PageAllocator(14, 4)
    sched = Scheduler(SchedulerConfig(max_tokens_per_step=256), alloc, FixedPolicy(2), spec.attention)
    reqs = [_request(f"r{i}", spec, 6, 20) for i in range(8)]
    for r in reqs:
        sched.add(r)
    rng = random.Random(0)
    in_flight = None
    for _ in range(5000):
        busy = frozenset(w.request.request_id for w in in_flight.works) if in_flight else frozenset()
        decoding = sum(r.state is RequestState.DECODING for r in sched.running)
        plan = sched.schedule(busy, max(1, -(-decoding // 2)))
        for rid in busy:  # still running, pages kept, not in the new plan
            r = next(r for r in reqs if r.request_id == rid)
            assert r.is_done or (r in sched.running and r.pages)
        assert not busy & {w.request.request_id for w in plan.works}
        if in_flight is not None:
            _commit_some(in_flight, rng)
            sched.complete_step(in_flight, 0.01)
        in_flight = plan if plan.works else None
        for r in list(sched.running):
            if r.state is RequestState.DECODING and r.committed[r.geometry.canvas_start:].all() \
                    and (in_flight is None or r not in [w.request for w in in_flight.works]):
                sched.finish(r, "length")
        if not sched.has_work() and in_flight is None:
            break
    assert all(r.state is RequestState.FINISHED for r in reqs)
    assert sum(r.stats.preemptions for r in reqs) > 0  # memory really was short
    assert alloc.used_pages == 0


# ---- when to pipeline: the rules ---------------------------------------------------------

def _flight(decoders: int, tokens_each: int, overhead: float):
    works = [SimpleNamespace(window=(0, 1), start=0, end=tokens_each) for _ in range(decoders)]
    plan = SimpleNamespace(works=works, num_tokens=decoders * tokens_each)
    return SimpleNamespace(plan=plan, overhead=overhead, pick=object())


def _flat_curve(tokens: float, requests: int) -> float:
    """An 8B-like device: 11 ms flat to 256 tokens, 40 us a token above."""
    return 0.011 + 4e-5 * max(0.0, tokens - 256)


def test_auto_pipelines_only_where_half_steps_are_cheaper_than_whole_ones():
    from optimus.engine.flight import PipelineWhenItPays

    rule = PipelineWhenItPays(_flat_curve)
    for _ in range(rule.min_steps):
        assert not rule.pipelines(256)  # too little seen yet: run whole steps and measure the host
        rule.observe(_flight(256, 2, overhead=0.009), 0.009, 256)  # 2 rows a request, 9 ms of host time
    # 256 requests: whole 21.2 + 9 ms; halves 2 x 11 ms (each 256 rows), the host hidden
    assert rule.pipelines(256)
    # 64 requests: whole 11 + 2.25 ms; halves 2 x 11 ms on a flat curve: no
    assert not rule.pipelines(64)
    # only whole steps teach it: a half step's gap is not host work
    before = (rule.tokens_per_request, rule.host_per_request)
    rule.observe(_flight(128, 9, overhead=0.0), None, 256)
    # nor do steps where few of the running requests decode (elastic widens their chunks)
    rule.observe(_flight(40, 33, overhead=0.001), 0.001, 256)
    assert (rule.tokens_per_request, rule.host_per_request) == before
    # a prompt's prefill piece in a step is not decoding work per request
    with_prefill = _flight(256, 2, overhead=0.009)
    with_prefill.plan.works.append(SimpleNamespace(window=None, start=0, end=4096))
    rule.observe(with_prefill, 0.009, 256)
    assert rule.tokens_per_request == pytest.approx(2.0)


def test_auto_keeps_whole_steps_when_the_host_is_cheap():
    from optimus.engine.flight import PipelineWhenItPays

    rule = PipelineWhenItPays(_flat_curve)
    for _ in range(rule.min_steps):
        rule.observe(_flight(256, 2, overhead=0.0005), 0.0005, 256)
    assert not rule.pipelines(256)  # 2 x 11 ms is more than 21.2 + 0.5 ms


def test_auto_probes_with_whole_steps_and_leaves_an_inflated_first_estimate():
    """A run's first steps pay one-off costs: 9 ms of host looks like halves pay. Pipelined steps
    show no host time, so only the probes (one whole step in every probe_every) correct it."""
    from optimus.engine.flight import PipelineWhenItPays

    rule = PipelineWhenItPays(_flat_curve)
    for _ in range(rule.min_steps):
        rule.observe(_flight(256, 2, overhead=0.009), 0.009, 256)
    decisions = []
    for _ in range(200):
        pipelined = rule.pipelines(256)
        decisions.append(pipelined)
        # the host really takes 0.5 ms; only a step after a whole one can show it
        rule.observe(_flight(256, 2, overhead=0.0005), None if pipelined else 0.0005, 256)
    assert decisions[:rule.probe_every] == [True] * rule.probe_every
    assert decisions[rule.probe_every] is False  # the first probe
    assert not any(decisions[-50:])  # the probes' measurements outvoted the start: whole steps
    assert rule.host_per_request == pytest.approx(0.0005 / 256)


def test_auto_keeps_pipelining_through_its_probes_where_halves_pay():
    from optimus.engine.flight import PipelineWhenItPays

    rule = PipelineWhenItPays(_flat_curve)
    decisions = []
    for _ in range(rule.min_steps + 100):
        pipelined = rule.pipelines(256)
        decisions.append(pipelined)
        rule.observe(_flight(256, 2, overhead=0.009), None if pipelined else 0.009, 256)
    tail = decisions[rule.min_steps:]
    assert sum(tail) >= len(tail) * rule.probe_every / (rule.probe_every + 1) - 1


@pytest.mark.parametrize("text,kind", [("off", "NeverPipeline"), ("auto", "PipelineWhenItPays"),
                                       ("16", "PipelineFrom")])
def test_pipeline_option_names_a_rule(text, kind):
    from optimus.engine.flight import pipeline_rule

    assert type(pipeline_rule(text, _flat_curve)).__name__ == kind


@pytest.mark.parametrize("text", ["0", "-3", "sometimes", ""])
def test_a_bad_pipeline_option_is_refused_by_name(text):
    from optimus.engine.flight import pipeline_rule

    with pytest.raises(ValueError, match="pipeline"):
        pipeline_rule(text, _flat_curve)


def test_an_auto_pipelined_engine_decodes_as_the_unpipelined_one(loaded):
    """On this CPU the forward runs inside the launch, so auto may or may not pipeline: either
    way the tokens are the unpipelined engine's."""
    prompts = _prompts(6, seed=4)
    params = [SamplingParams(max_tokens=10, ignore_eos=True)] * 6
    llm = LLM(loaded=loaded, policy="fixed:4", pipeline="auto", **OPTIONS)
    assert type(llm.engine.flights.pipeline).__name__ == "PipelineWhenItPays"
    assert _run(loaded, 0, prompts, params) == [
        (o.token_ids, o.finish_reason) for o in llm.generate(prompts, params[0])]


def test_whole_steps_with_certain_commits_are_assumed_and_stop_the_halves():
    """A diffusion step whose windows each have one masked position left is assumed (overlap),
    a half among halves too: it hides the host as halves do, without their second pass over the
    curve. Once a step is assumed, no halves are planned; a step with a wider window completes
    at once and halves may resume."""
    from optimus.engine.flight import FlightRules, InFlight, PipelineFrom

    def flight(positions_per_window):
        bounds = np.cumsum([0, *positions_per_window])
        wants = LogitWants(np.arange(len(positions_per_window)), bounds, np.arange(bounds[-1]))
        return InFlight(None, None, wants, pick=object(), t_launch=0.0, overhead=0.0, captured=False,
                        device_time=None)

    rules = FlightRules(causal=False, overlap=True, pipeline=PipelineFrom(4), overlap_diffusion=True)
    assert rules.keep(flight([1, 2]), running=8) == "pipeline"  # halves are on: commits unknown, a half stays a half
    assert rules.pipelines(8)
    assert rules.keep(flight([1, 1]), running=8) == "assume"  # commits certain: assumed, halves or not
    assert not rules.pipelines(8) and rules.decoder_cap([]) is None  # whole steps from here
    assert rules.keep(flight([1, 1, 1]), running=8) == "assume"
    assert rules.keep(flight([1, 2]), running=8) is None  # two masked positions: commits unknown
    assert rules.pipelines(8)  # not assumed: the halves' rule decides again
    off = FlightRules(causal=False, overlap=False, pipeline=PipelineFrom(0), overlap_diffusion=True)
    assert off.keep(flight([1]), running=8) is None
    refreshing = FlightRules(causal=False, overlap=True, pipeline=PipelineFrom(0), overlap_diffusion=False)
    assert refreshing.keep(flight([1]), running=8) is None  # dual / prefix cache: synchronous
