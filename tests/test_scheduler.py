"""Scheduler and KV-page manager driven by a fake model runner (no model, no tensors)."""

import random

import pytest

from optimus.config import SchedulerConfig
from optimus.core.request import make_geometry
from optimus.scheduler.pages import PageAllocator
from optimus.core.params import SamplingParams
from optimus.policy.fixed import FixedPolicy
from optimus.core.request import Request, RequestState
from optimus.scheduler.scheduler import QueueFullError, Scheduler
from fixtures.checkpoints import make_tiny_model
from optimus.models.spec import AttentionKind



def _spec(kind: str):
    return make_tiny_model(kind)[1]


def _request(rid, spec, prompt_len, max_tokens, block=4):
    g = make_geometry(spec, block, prompt_len, max_tokens)
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), g, spec.mask_id or 0)


class FakeRunner:
    """Commits a random non-empty subset of each window's masked positions."""

    def __init__(self, seed=0):
        self.rng = random.Random(seed)
        self.steps_with_prefill_and_decode = 0

    def run(self, plan):
        kinds = {w.window is None for w in plan.works}
        if kinds == {True, False}:
            self.steps_with_prefill_and_decode += 1
        for w in plan.works:
            r = w.request
            r.last_committed = 0
            if w.window is None:
                continue
            masked = [p for p in range(*w.window) if not r.committed[p]]
            for p in (self.rng.sample(masked, self.rng.randint(1, len(masked))) if masked else []):
                r.committed[p], r.tokens[p] = True, 7
                r.last_committed += 1


def _drive(sched, runner, steps, on_step=None):
    finished = []
    for _ in range(steps):
        plan = sched.schedule()
        _check_plan(plan, sched)
        runner.run(plan)
        sched.complete_step(plan, 0.01)
        for r in list(sched.running):
            if r.state is RequestState.DECODING and all(r.committed[r.geometry.canvas_start:]):
                sched.finish(r, "length")
                finished.append(r)
        if on_step:
            on_step()
        if not sched.has_work():
            break
    return finished


def _check_plan(plan, sched):
    budget = sched.config.max_tokens_per_step
    assert plan.num_tokens <= budget + len(sched.running) * 4  # stores may exceed by one block each
    for w in plan.works:
        r = w.request
        assert w.start <= w.store_end <= w.end
        assert w.row_groups() == sorted(w.row_groups())
        assert len(r.pages) * sched.allocator.page_size >= w.store_end


def _make(kind="sdar", pages=64, **cfg):
    spec = _spec(kind)
    alloc = PageAllocator(pages, 4)
    sched = Scheduler(SchedulerConfig(**cfg), alloc, FixedPolicy(2), spec.attention)
    return spec, alloc, sched


def test_pages_freed_exactly_once():
    alloc = PageAllocator(4, 16)
    pages = alloc.allocate(2)
    alloc.free(pages)
    with pytest.raises(RuntimeError, match="freed twice"):
        alloc.free(pages[:1])
    with pytest.raises(MemoryError):
        alloc.allocate(5)


@pytest.mark.parametrize("kind", ["sdar", "llada", "dream", "llama"])
def test_no_leak_after_random_joins_and_aborts(kind):
    spec, alloc, sched = _make(kind, pages=48, max_tokens_per_step=64, prefill_chunk=8, max_waiting=10_000)
    rng = random.Random(1)
    runner = FakeRunner(2)
    live = []
    for i in range(2000):
        if rng.random() < 0.5:
            r = _request(f"r{i}", spec, rng.randint(1, 20), rng.randint(1, 12))
            sched.add(r)
            live.append(r)
        if live and rng.random() < 0.2:
            victim = live.pop(rng.randrange(len(live)))
            if not victim.is_done:
                sched.abort(victim.request_id)
        _drive(sched, runner, 1)
        assert alloc.used_pages == sum(len(r.pages) for r in sched.running + list(sched.waiting))
    _drive(sched, runner, 10_000)
    assert not sched.has_work()
    assert alloc.used_pages == 0 and alloc.free_pages == alloc.num_pages


def test_admission_under_memory_pressure_and_no_starvation():
    # 10 pages of 4 tokens: room for only a couple of requests at once.
    spec, alloc, sched = _make("sdar", pages=10, max_tokens_per_step=256)
    reqs = [_request(f"r{i}", spec, 12, 8) for i in range(12)]
    for r in reqs:
        sched.add(r)
    peak = []
    finished = _drive(sched, FakeRunner(), 5000, on_step=lambda: peak.append(len(sched.running)))
    assert {r.request_id for r in finished} == {r.request_id for r in reqs}  # nobody starves
    assert max(peak) < len(reqs)  # admission was limited by memory
    assert alloc.used_pages == 0


def test_preemption_recomputes_and_keeps_commits():
    spec, alloc, sched = _make("sdar", pages=9, max_tokens_per_step=256)
    reqs = [_request(f"r{i}", spec, 4, 24) for i in range(3)]
    for r in reqs:
        sched.add(r)
    finished = _drive(sched, FakeRunner(3), 5000)
    assert len(finished) == 3
    assert sum(r.stats.preemptions for r in reqs) > 0
    assert alloc.used_pages == 0


def test_chunked_prefill_interleaves_with_decoding():
    spec, alloc, sched = _make("sdar", pages=256, max_tokens_per_step=32, prefill_chunk=8)
    sched.add(_request("short", spec, 4, 40))
    runner = FakeRunner()
    _drive(sched, runner, 2)
    sched.add(_request("long", spec, 200, 8))  # 200-token prompt, 8 per step
    _drive(sched, runner, 10)
    assert runner.steps_with_prefill_and_decode >= 5  # the short request kept decoding


def test_queue_bound_counts_only_requests_that_cannot_start():
    spec, alloc, sched = _make("sdar", max_waiting=2, max_running=3)
    for name in "abcde":  # 3 free running slots + 2 waiting places
        sched.add(_request(name, spec, 4, 4))
    with pytest.raises(QueueFullError):
        sched.add(_request("f", spec, 4, 4))
    sched.schedule()  # a, b, c start running: the free slots are taken
    assert len(sched.running) == 3 and len(sched.waiting) == 2
    with pytest.raises(QueueFullError):
        sched.add(_request("g", spec, 4, 4))
    sched.abort("a")  # a running slot frees up: one more may queue for it
    sched.add(_request("h", spec, 4, 4))
    with pytest.raises(QueueFullError):
        sched.add(_request("i", spec, 4, 4))


def _grouped(rid, spec, group):
    r = _request(rid, spec, 4, 8)
    r.group = group
    return r


def test_one_callers_fan_out_does_not_starve_another_caller():
    spec, alloc, sched = _make("sdar", max_running=4, max_waiting=64)
    for i in range(12):
        sched.add(_grouped(f"fan-{i}", spec, "fan"))
    sched.schedule()
    assert {r.group for r in sched.running} == {"fan"} and len(sched.running) == 4
    sched.add(_grouped("single", spec, "single"))  # arrives behind eight waiting fan-out requests
    sched.abort(sched.running[0].request_id)
    sched.schedule()
    assert "single" in {r.request_id for r in sched.running}  # the freed slot went to the other caller
    assert [r.request_id for r in sched.waiting][:2] == ["fan-4", "fan-5"]  # the fan-out keeps its order


def test_ungrouped_requests_are_admitted_first_come_first_served():
    spec, alloc, sched = _make("sdar", max_running=2, max_waiting=64)
    for i in range(5):
        sched.add(_request(f"r{i}", spec, 4, 4))
    sched.schedule()
    assert [r.request_id for r in sched.running] == ["r0", "r1"]
    sched.abort(sched.running[0].request_id)
    sched.schedule()
    assert [r.request_id for r in sched.running] == ["r1", "r2"]


def test_illegal_transition_is_refused():
    spec, _, _ = _make()
    r = _request("a", spec, 4, 4)
    with pytest.raises(RuntimeError, match="illegal transition"):
        r.transition(RequestState.FINISHED)


def test_geometry_follows_each_family():
    sdar, llada, dream = _spec("sdar"), _spec("llada"), _spec("dream")
    g = make_geometry(sdar, 4, prompt_len=6, max_tokens=5)
    assert (g.block_origin, g.prefill_len, g.canvas_end, g.shift) == (0, 4, 12, 0)
    g = make_geometry(llada, 4, prompt_len=6, max_tokens=5)
    assert (g.block_origin, g.prefill_len, g.canvas_end, g.shift) == (6, 6, 14, 0)
    g = make_geometry(dream, 4, prompt_len=6, max_tokens=5)
    assert (g.prefill_len, g.shift) == (5, 1)
    assert sdar.attention is AttentionKind.BLOCK_CAUSAL


@pytest.mark.parametrize("family", ["sdar", "llada", "dream"])
def test_window_bounds_follow_the_block_of_the_window_start(family):
    """The inlined arithmetic equals the block geometry's own: the window starts past the cache
    (and never before the canvas) and ends with its block, clipped to the canvas."""
    spec = _spec(family)
    for block, prompt_len, max_tokens in [(4, 6, 5), (8, 3, 17), (32, 40, 64), (1, 5, 3)]:
        g = make_geometry(spec, block, prompt_len=prompt_len, max_tokens=max_tokens)
        r = Request("r", tuple(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), g, mask_id=0)
        for cache_len in range(0, g.canvas_end - g.shift):
            r.cache_len = cache_len
            lo = max(cache_len + g.shift, g.canvas_start)
            assert r.window_bounds() == (lo, min(g.block_end(lo), g.canvas_end))
            assert r.max_chunk() == min(g.block_end(lo), g.canvas_end) - lo


class ScriptedSizes:
    """Test policy: hands out chunk sizes from a script, then 1."""

    name = "scripted"

    def __init__(self, sizes):
        self.sizes = list(sizes)

    def choose(self, view):
        return [self.sizes.pop(0) if self.sizes else 1 for _ in view.requests]

    def observe(self, feedback):
        pass


@pytest.mark.parametrize("family", ["sdar", "llada", "dream"])
def test_a_window_never_covers_only_positions_a_wider_window_committed(family):
    """A window of 4 commits its block's positions 0, 2 and 3; the next window, of 2, commits
    position 1 and finishes. Positions 2 and 3 are committed already: they are stored with it,
    and the next window starts in the next block (a window over them would predict nothing)."""
    spec = _spec(family)
    sched = Scheduler(SchedulerConfig(), PageAllocator(64, 4), ScriptedSizes([4, 2]), spec.attention)
    r = _request("r", spec, prompt_len=4, max_tokens=8)
    sched.add(r)
    while r.state is not RequestState.DECODING:
        sched.complete_step(sched.schedule(), 0.01)
    start = r.geometry.canvas_start
    windows = []
    for commits in ([start, start + 2, start + 3], [start + 1], None):
        plan = sched.schedule()
        (work,) = [w for w in plan.works if w.window is not None]
        windows.append(work.window)
        commits = commits or [work.window[0]]
        r.committed[commits] = True
        r.last_committed = len(commits)
        sched.complete_step(plan, 0.01)
    first, second, third = windows
    assert first == (start, start + 4) and second == (start, start + 2)
    assert third[0] == r.geometry.block_end(start)  # not (start + 2, start + 4): nothing open there


@pytest.mark.parametrize("policy", ["fixed:4", "fixed:8"])
def test_policy_feedback_counts_the_open_positions_the_canvas_holds(policy):
    """The commit tells the scheduler how many masked positions each window keeps; the
    policy's feedback must equal a recount from the canvas (greedy and sampled alike)."""
    from fixtures.engine import tiny_loaded

    from optimus.config import engine_config
    from optimus.engine.engine import Engine

    engine = Engine(engine_config(policy=policy, device="cpu", num_pages=64, page_size=4, block_size=8),
                    loaded=tiny_loaded("sdar"))
    engine.add_request("greedy", [1, 2, 3], SamplingParams(max_tokens=16, ignore_eos=True))
    engine.add_request("sampled", [4, 5], SamplingParams(max_tokens=16, ignore_eos=True, temperature=0.8, seed=1))
    seen = []
    complete = engine.scheduler.complete_step

    def recounting(plan, *args, **kwargs):
        recount = {w.request.request_id: int((~w.request.committed[w.window[0]:w.window[1]]).sum())
                   + w.request.last_committed for w in plan.works if w.window is not None}
        feedback = complete(plan, *args, hold=True, **{k: v for k, v in kwargs.items() if k != "hold"})
        if feedback is not None:
            seen.append((dict(zip(feedback.request_ids, feedback.open_positions)), recount))
            engine.scheduler.give_feedback(feedback)
        return None

    engine.scheduler.complete_step = recounting
    for _ in range(200):
        engine.step()
        if not engine.has_work():
            break
    assert not engine.has_work() and len(seen) > 4
    assert all(found == recount for found, recount in seen)


class _AheadPolicy(FixedPolicy):
    """fixed:2 that records the views it is handed ahead of a step."""

    uniform_chunk = None  # the scheduler asks choose with views

    def __init__(self):
        super().__init__(2)
        self.ahead = []

    def plan_ahead(self, view):
        self.ahead.append(view)

    def take_ahead(self, request_ids, max_chunks, fixed_tokens, token_budget):
        self.asked = request_ids, max_chunks
        return [1] * len(request_ids)


def test_plan_ahead_hands_the_policy_the_running_decoders_on_block_caps():
    """While the device computes a step the policy may plan the next: every decoding request,
    oldest first, on its block size (the block ends it will reach are not known yet), with no
    token budget, and with the work each has left."""
    spec = _spec("sdar")
    policy = _AheadPolicy()
    sched = Scheduler(SchedulerConfig(), PageAllocator(64, 4), policy, spec.attention)
    for rid in ("a", "b"):
        sched.add(_request(rid, spec, 4, 16, block=8))
    runner = FakeRunner()
    while len(sched.running) < 2 or not all(r.state is RequestState.DECODING for r in sched.running):
        plan = sched.schedule()
        runner.run(plan)
        sched.complete_step(plan, 0.01)
    sched.plan_ahead()
    (view,) = policy.ahead
    assert [v.request_id for v in view.requests] == ["a", "b"]
    assert [(v.max_chunk, v.block_size) for v in view.requests] == [(8, 8), (8, 8)]
    assert view.token_budget >= 1 << 20 and view.fixed_tokens == 0
    assert [v.remaining for v in view.requests] == [r.geometry.canvas_end - r.window_bounds()[0] for r in sched.running]
    plan = sched.schedule()  # the step asks for the plan before building views: all at 1 here
    assert policy.asked == (("a", "b"), [r.max_chunk() for r in sched.running])
    assert [w.window[1] - w.window[0] for w in plan.works if w.window] == [1, 1]
    sched.running[0].params = SamplingParams(max_tokens=16, policy="ar")  # a pinned request: no plan ahead
    sched.plan_ahead()
    assert len(policy.ahead) == 1


def test_the_policy_is_told_whether_prompt_rows_may_join_the_step():
    # The policy prices the prefill load others bring only while some prompt waits
    class Recording(FixedPolicy):
        uniform_chunk = None  # ask choose every step

        def choose(self, view):
            self.seen.append(view.load_pending)
            return super().choose(view)

    spec, alloc, sched = _make("sdar", pages=256, max_tokens_per_step=32, prefill_chunk=8)
    sched.policy = policy = Recording(2)
    policy.seen = []
    sched.add(_request("short", spec, 4, 40))
    runner = FakeRunner()
    _drive(sched, runner, 3)
    assert policy.seen and not any(policy.seen)  # one request, its prompt done: nothing joins
    sched.add(_request("long", spec, 40, 8))  # 40-token prompt, 8 rows a step
    policy.seen = []
    _drive(sched, runner, 3)
    assert policy.seen[:3] == [True, True, True]


def test_wide_chunks_leave_a_full_step_to_the_prompts_that_wait():
    # A chunk wider than 1 would push a waiting prompt's rows into a step of their own: while
    # prompts fill the step, the policy's budget holds only one position per decoder.
    class Recording(FixedPolicy):
        uniform_chunk = None  # ask choose every step

        def choose(self, view):
            self.seen.append((len(view.requests), view.fixed_tokens, view.token_budget))
            return super().choose(view)

    spec, alloc, sched = _make("sdar", pages=256, max_tokens_per_step=32, prefill_chunk=16, max_running=8)
    sched.policy = policy = Recording(4)
    policy.seen = []
    sched.add(_request("first", spec, 4, 64))
    runner = FakeRunner()
    _drive(sched, runner, 2)
    assert policy.seen[-1][2] == 32  # no prompt waits: the whole step is the policy's
    for i in range(3):  # 48 prompt rows, 16 a step each: more than the step holds
        sched.add(_request(f"long{i}", spec, 16, 8))
    policy.seen = []
    _drive(sched, runner, 1)
    n, fixed, budget = policy.seen[0]
    assert n == 1 and budget == fixed + n


@pytest.mark.parametrize("pages_left", [True, False])
def test_prompts_that_cannot_start_leave_the_step_to_the_chunks(pages_left):
    class Recording(FixedPolicy):
        uniform_chunk = None

        def choose(self, view):
            self.seen.append((view.fixed_tokens, view.token_budget))
            return super().choose(view)

    spec, alloc, sched = _make("sdar", pages=64, max_tokens_per_step=32, prefill_chunk=16, max_running=8)
    sched.policy = policy = Recording(4)
    policy.seen = []
    sched.add(_request("first", spec, 4, 4))  # its prompt and its one block fit the pages admission reserves
    _drive(sched, FakeRunner(), 1)
    if not pages_left:
        alloc.allocate(alloc.free_pages)
    for i in range(3):
        sched.add(_request(f"late{i}", spec, 16, 8))
    sched.schedule()
    fixed, budget = policy.seen[-1]
    assert budget == (fixed + 1 if pages_left else 32)  # 48 prompt rows wait for a 32-row step
    assert len(sched.waiting) == (1 if pages_left else 3)
