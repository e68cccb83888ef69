"""The elastic controller's step-time model: the device's time apart from the host's share of
a step, and steps whose host work overlaps the device (every window one open position)."""

from __future__ import annotations

import numpy as np
import pytest

from optimus.policy import RequestView, StepFeedback, StepView
from optimus.policy.elastic.controller import ElasticPolicy
from optimus.policy.elastic.estimators import TokenLoad
from optimus.policy.elastic.host_share import HostShare
from optimus.policy.elastic.latency import LatencyProfile

PROFILE = LatencyProfile.synthetic(0.010, 384, 0.010 / 384)  # 10 ms flat to 384 tokens
LOW_TAU = {1: 1.0, 2: 1.1, 4: 1.25, 8: 1.4, 16: 1.5, 32: 1.6}  # a real 8B model's few commits per step


def _view(n: int) -> StepView:
    return StepView(tuple(RequestView(f"r{i}", 32, 32, None) for i in range(n)), 0, 1 << 20)


def _unit_step(n: int, tokens: int, latency_s: float, device_s: float, **kw) -> StepFeedback:
    """n requests at size 1, each committing its position."""
    return StepFeedback(tokens, latency_s, (1,) * n, (1,) * n, tuple(f"r{i}" for i in range(n)), (1,) * n,
                        device_s=device_s, **kw)


def test_host_share_fits_a_line_through_the_steps_and_ignores_one_off_costs():
    share = HostShare()
    for _ in range(3):
        share.observe(200, 0.004)
    assert share(np.array([100.0]))[0] == 0.0  # fewer than 4 steps: no host time yet
    share.observe(200, 0.004)
    assert share(np.array([100.0, 400.0])).tolist() == [0.004, 0.004]  # one size: no slope
    share = HostShare()
    share.observe(300, 0.080)  # a first step that paid a one-time cost
    for n in (100, 300, 500) * 5:
        share.observe(n, 0.001 + 2e-6 * n)
    assert (share.intercept, share.slope) == (pytest.approx(0.001, rel=1e-6), pytest.approx(2e-6, rel=1e-6))
    for n, h in ((100, 0.003), (300, 0.001)) * 40:  # more rows, less time: no slope
        share.observe(n, h)
    assert share.slope == 0.0 and share.intercept == pytest.approx(0.002, rel=1e-6)


def test_the_curve_learns_the_device_and_the_host_share_apart():
    """Steps that wait 5 ms on the host beside a device that follows the profile exactly: with the
    device's time reported, the curve is left as it is and 5 ms is the host's; without it, the
    curve itself is scaled up (and so over-charges the flat part, where the host share is not
    a multiple of the device's time)."""
    told, blind = ElasticPolicy(PROFILE, LOW_TAU), ElasticPolicy(PROFILE, LOW_TAU)
    for i in range(200):
        chunk = (1, 3, 7, 11)[i % 4]
        tokens = 64 * (chunk + 1)  # windows and their stores: 128 to 768 rows, past the knee
        device = float(PROFILE.predict(tokens, 64))
        for p, reported in ((told, device), (blind, 0.0)):
            p.observe(StepFeedback(tokens, device + 0.005, (chunk,) * 64, (1,) * 64,
                                   tuple(f"r{k}" for k in range(64)), device_s=reported))
    assert told.correction.scale == pytest.approx(1.0, abs=0.01) and told.correction.stretch == 1.0
    assert told.host(np.array([300.0]))[0] == pytest.approx(0.005, rel=0.01)
    assert blind.correction.scale > 1.2 and blind.host(np.array([300.0]))[0] == 0.0


def test_prompt_steps_teach_no_host_share():
    """A step of mostly prompt rows spends its host time on the prompts."""
    p = ElasticPolicy(PROFILE, LOW_TAU)
    for _ in range(8):
        p.observe(_unit_step(64, 16384, 0.400, 0.200))
    assert p.host(np.array([128.0]))[0] == 0.0
    for _ in range(8):
        p.observe(_unit_step(64, 128, 0.012, 0.010))
    assert p.host(np.array([128.0]))[0] == pytest.approx(0.002)


@pytest.mark.parametrize("overlaps", [True, False])
def test_overlapped_unit_steps_win_where_whole_steps_pay_the_host(overlaps):
    """64 requests, 3 ms of host time beside a 10 ms step, commits that barely grow with the chunk.
    Paying the host every step, windows of 4 commit the most per second (1.25 x 64 per 13.5 ms);
    where the engine overlaps steps of one open position per window, everyone at 1 pays the
    device's 10 ms alone and wins (64 per 10 ms)."""
    p = ElasticPolicy(PROFILE, LOW_TAU, per_request=False, unit_steps_overlap=overlaps)
    for i in range(128):  # the 256-row steps hold prompt rows: their host time is no evidence
        tokens = (128, 256)[i % 2]
        p.observe(_unit_step(64, tokens, 0.013, 0.010, overhead_s=0.0005))
    sizes = p.choose(_view(64))
    if overlaps:
        assert sizes == [1] * 64
    else:
        assert sum(sizes) >= 3 * 64
    # The time between two overlapped steps' ends is no whole step's host share (and fewer
    # than forget_after steps in a row that teach none leave the window as it was).
    for i in range(p.host.forget_after // 2):
        p.observe(_unit_step(64, 128, 0.020, 0.010, overlapped=True, overhead_s=0.005))
    assert p.host(np.array([128.0]))[0] == pytest.approx(0.003) and p.overhead_s == pytest.approx(0.0005, rel=0.05)


def test_one_admission_of_many_prompts_does_not_read_as_lasting_load():
    """A step that prefills a whole batch of prompts (16k rows) once: within 60 steps the load
    model is back near no extra rows and no lumps. Prompts that keep arriving (256 rows every
    fourth step) are load and lumps: their mean and spread are learned as they are."""
    once = TokenLoad()
    once.observe(16384 + 128, 128, 0.0, 64)
    for _ in range(60):
        once.observe(128, 128, 0.0, 64)
    assert once.extra_var ** 0.5 < 32 and once.per_commit < 0.05
    unclipped = TokenLoad(clip=1e9)
    unclipped.observe(16384 + 128, 128, 0.0, 64)
    for _ in range(60):
        unclipped.observe(128, 128, 0.0, 64)
    assert unclipped.extra_var ** 0.5 > 500  # what the clip prevents
    recurring = TokenLoad()
    for i in range(300):
        recurring.observe(128 + (256 if i % 4 == 0 else 0), 128, 0.0, 64)
    assert recurring.extra_var ** 0.5 == pytest.approx(256 * (0.25 * 0.75) ** 0.5, rel=0.1)
    assert recurring.per_commit == pytest.approx(64 / 64, rel=0.15)  # 64 rows a step on average, 64 commits


@pytest.mark.parametrize("family,cache_mode,overlaps", [("sdar", "auto", True), ("llada", "prefix-block", True),
                                                         ("llada", "dual-cache", False)])
def test_the_engine_tells_elastic_its_device_time_and_whether_unit_steps_overlap(family, cache_mode, overlaps):
    """Built by the engine, elastic knows whether unit steps overlap (a scheme that prefills,
    overlap on), and learns the host share of whole decoding steps from the device time the
    engine reports (on a CPU the forward's own time inside the launch)."""
    from fixtures.engine import tiny_loaded
    from optimus.core.params import SamplingParams
    from optimus.engine.llm import LLM

    llm = LLM(loaded=tiny_loaded(family), policy="elastic", device="cpu", num_pages=256, page_size=4, block_size=8,
              cache_mode=cache_mode)
    policy = llm.engine.policy
    assert policy.unit_steps_overlap is overlaps
    llm.generate([[5, 6, 7, 8]] * 4, SamplingParams(max_tokens=24, ignore_eos=True))
    tokens, seconds = policy.host.window()
    assert tokens.size and (seconds >= 0).all()  # overlapped steps (most, on sdar) teach none


def test_prompt_steps_do_not_set_the_host_time_decoding_steps_pay():
    """A batch that arrives at once spends its first steps on prompts (thousands of rows, a
    long plan and build each): their host time between steps is not what a decoding plan pays,
    and must not price the decoding steps after them (which at size 1 overlap and so never
    correct it)."""
    p = ElasticPolicy(PROFILE, LOW_TAU)
    ids = tuple(f"r{i}" for i in range(16))
    for _ in range(50):  # 16 decoding requests beside 4,000 prompt rows, 8 ms between steps
        p.observe(StepFeedback(4096, 0.050, (4,) * 16, (1,) * 16, ids, overhead_s=0.008, device_s=0.045))
    assert p.overhead_s == 0.0
    for _ in range(50):  # decoding alone, 1 ms between steps
        p.observe(StepFeedback(16 * 5, 0.011, (4,) * 16, (1,) * 16, ids, overhead_s=0.001, device_s=0.010))
    assert p.overhead_s == pytest.approx(0.001, rel=0.1)


def test_one_pause_between_steps_does_not_price_every_step():
    """A collection or a slow report between two steps (80 ms once among 1 ms gaps) must not
    raise the host time a decoding plan pays; a lasting change moves it within the window."""
    p = ElasticPolicy(PROFILE, LOW_TAU)
    ids = tuple(f"r{i}" for i in range(4))
    step = lambda gap: StepFeedback(4 * 9, 0.006, (8,) * 4, (2,) * 4, ids, overhead_s=gap, device_s=0.005)  # noqa: E731
    for gap in [0.001] * 40 + [0.080] + [0.001] * 3:
        p.observe(step(gap))
    assert p.overhead_s == pytest.approx(0.001)
    for _ in range(20):
        p.observe(step(0.003))
    assert p.overhead_s == pytest.approx(0.003)


def test_whole_steps_are_tried_until_their_gap_is_measured_a_few_times():
    """One long gap at the start (a first call, a collection) is no price yet: fewer than
    StepGaps.min_steps whole steps measured leaves the host time at none."""
    p = ElasticPolicy(PROFILE, LOW_TAU, per_request=False, unit_steps_overlap=True)
    p.observe(StepFeedback(3, 0.011, (2,), (1,), ("r0",), (2,), overhead_s=0.035, device_s=0.010))
    assert p.overhead_s == 0.0 and p.choose(_view(1)) != [1]


def test_a_gap_priced_too_high_is_unlocked_by_the_overlapped_steps_it_chose():
    """One request; whole steps of 16 commit 1.5 for 10 ms of device and 1 ms of host time,
    overlapped size-1 steps 1 for 10 ms. The first whole steps met 35 ms gaps (one-time costs):
    size 1 then looks best, and size-1 steps overlap, so no whole step re-measures the gap. The
    overlapped steps' own gaps (1.5 ms, which hold everything a whole step's gap does) bound it,
    and the policy goes back to whole steps at the 1 ms they really pay."""
    p = ElasticPolicy(PROFILE, LOW_TAU, per_request=False, unit_steps_overlap=True)
    whole_gaps = [0.035] * 4
    sizes = []
    for _ in range(60):
        size = p.choose(_view(1))[0]
        sizes.append(size)
        unit = size == 1
        gap = 0.0015 if unit else (whole_gaps.pop(0) if whole_gaps else 0.001)
        committed = 1 if unit else min(2, size)
        p.observe(StepFeedback(size + committed, 0.010 + (0.0 if unit else 0.001), (size,), (committed,), ("r0",),
                               (size,), overhead_s=gap, device_s=0.010, overlapped=unit))
    assert 1 in sizes[:20]  # the 35 ms gaps did price whole steps out
    assert min(sizes[-20:]) > 1 and p.overhead_s == pytest.approx(0.001)


def test_host_share_forgets_a_window_no_step_has_added_to_lately():
    share = HostShare(forget_after=8)
    for n, h in ((32, 0.0), (16, 0.0), (292, 0.012), (528, 0.022)):
        share.observe(n, h)
    for _ in range(7):
        share.idle_step()
    assert share.slope > 20e-6 and share.points == 4
    share.observe(32, 0.001)  # a step that taught: the count starts again
    for _ in range(7):
        share.idle_step()
    assert share.points == 5
    share.idle_step()
    assert share.points == 0 and share(np.array([292.0]))[0] == 0.0


def test_a_few_early_whole_steps_do_not_hold_elastic_at_size_one_for_good():
    """16 requests; whole steps pay a host line that two large early steps made steep (41 us a
    row), and the size-1 steps after them overlap (they teach no host share). Within
    ``forget_after`` such steps elastic tries size 16 again, which the device's curve favours
    (2 commits in the same 10 ms); when steps there keep paying 12 ms on the host, it goes
    back to size 1."""
    p = ElasticPolicy(PROFILE, LOW_TAU, per_request=False, unit_steps_overlap=True)
    ids = tuple(f"r{i}" for i in range(16))

    def step(size: int, tokens: int, host_s: float, overlapped: bool = False) -> StepFeedback:
        commits = 1 if size == 1 else 2  # about the curve's 1.5-1.6 at sizes 16 and 32
        return StepFeedback(tokens, 0.010 + host_s, (size,) * 16, (commits,) * 16, ids, (size,) * 16,
                            device_s=0.010, overlapped=overlapped)

    for size, tokens, host_s in ((1, 32, 0.0), (1, 16, 0.0), (1, 32, 0.0), (16, 292, 0.012), (32, 528, 0.022)):
        p.observe(step(size, tokens, host_s))
    for _ in range(p.host.forget_after - 1):
        p.observe(step(1, 32, 0.0, overlapped=True))
    assert p.choose(_view(16)) == [1] * 16
    p.observe(step(1, 32, 0.0, overlapped=True))
    assert min(p.choose(_view(16))) >= 8
    for _ in range(6):
        p.observe(step(16, 292, 0.012))
    assert p.choose(_view(16)) == [1] * 16
