"""The array pass that settles a step's quiet requests (engine/settle.py) decides exactly
what settling each request alone decides: same answers, finish reasons, texts and outputs."""

import numpy as np
import pytest

from fixtures.engine import tiny_loaded
from optimus.core.canvases import Canvases
from optimus.core.params import SamplingParams
from optimus.engine import settle
from optimus.engine.settle import scan_answers
from optimus.engine.llm import LLM
from optimus.policy.elastic.controller import ElasticPolicy
from optimus.policy.elastic.host_share import StepGaps
from optimus.policy.elastic.latency import LatencyProfile


def _run(loaded, prompts, params, policy, **options):
    """Every output of every step, as (request id, ids, finished, reason, text), and the finals."""
    llm = LLM(loaded=loaded, policy=policy, device="cpu", num_pages=256, page_size=4, block_size=8, **options)
    engine = llm.engine
    engine.post.stream_text = True
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, p)
    steps = []
    while engine.has_work():
        steps.append([(o.request_id, tuple(o.token_ids), o.finished, o.finish_reason, o.text)
                      for o in engine.step()])
    return steps


def _timing_blind(monkeypatch, tmp_path) -> dict:
    """Elastic planning on a fixed curve and learning nothing from step times: settling one by
    one is slower, and a run's chunk sizes must not follow its timing (they would decide other
    tokens). Its choices still follow the commits, so they mix sizes. -> the engine options."""
    monkeypatch.setattr(ElasticPolicy, "_observe_latency", lambda self, feedback, prompts: None)
    monkeypatch.setattr(StepGaps, "observe", lambda self, gap_s, overlapped: None)
    path = LatencyProfile.synthetic(0.002, 64, 3e-5).save(tmp_path / "profile.json")
    return {"profile_path": str(path)}


@pytest.mark.parametrize("policy", ["fixed:3", "fixed:8", "elastic"])
def test_settling_in_arrays_equals_settling_each_request(monkeypatch, tmp_path, policy):
    options = _timing_blind(monkeypatch, tmp_path) if policy == "elastic" else {}
    loaded = tiny_loaded("sdar")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 200, int(rng.integers(2, 19))).tolist() for _ in range(12)]
    free = [SamplingParams(max_tokens=int(m), ignore_eos=True) for m in rng.integers(3, 20, 12)]
    finals = [s[-1] for s in _finals(_run(loaded, prompts, free, policy, **options))]
    params = []
    for i, (p, (_, answer, _, _, text)) in enumerate(zip(free, finals)):
        kind = i % 6
        if kind == 0:  # a stop id met midway
            params.append(SamplingParams(max_tokens=p.max_tokens, ignore_eos=True, stop_token_ids=(answer[len(answer) // 2],)))
        elif kind == 1:  # a stop id deferred by min_tokens
            params.append(SamplingParams(max_tokens=p.max_tokens, ignore_eos=True, stop_token_ids=(answer[0],),
                                         min_tokens=2))
        elif kind == 2:  # a stop string met midway
            params.append(SamplingParams(max_tokens=p.max_tokens, ignore_eos=True, stop=(text[len(text) // 2:][:2],)))
        elif kind == 3:  # the model's end-of-answer ids count
            params.append(SamplingParams(max_tokens=p.max_tokens))
        else:
            params.append(p)
    in_arrays = _run(loaded, prompts, params, policy, **options)
    monkeypatch.setattr(settle, "scan_answers", _unused)
    monkeypatch.setattr(Canvases, "slots", staticmethod(lambda requests: None))  # one request at a time
    one_by_one = _run(loaded, prompts, params, policy, **options)
    assert in_arrays == one_by_one
    reasons = {f[3] for f in (s[-1] for s in _finals(in_arrays))}
    assert {"stop", "length"} <= reasons  # the stop paths were taken


def _finals(steps):
    by_id = {}
    for step in steps:
        for out in step:
            by_id.setdefault(out[0], []).append(out)
    return [by_id[k] for k in sorted(by_id, key=int)]


def _unused(*args, **kwargs):
    raise AssertionError("the one-by-one run must not scan in arrays")


class _Request:
    def __init__(self, frontier, output_len, max_tokens, stop=(), min_tokens=0):
        self.frontier, self.output_len = frontier, output_len
        self.params = SamplingParams(max_tokens=max_tokens, stop=stop, min_tokens=min_tokens)


def test_a_scan_finds_each_frontier_and_sends_every_possible_finish_to_the_exact_check():
    canvases = Canvases(capacity=256, slots=8)
    # Five canvases of 16 answer positions after a 4-token prompt, block 8; their spans lie
    # end to end, so a scan that ran past its canvas would read the next one's flags.
    committed = [list(range(3)),  # 0: frontier 0 -> 3
                 list(range(3)) + [5],  # 1: 3 committed, a gap, then one more -> 3
                 list(range(16)),  # 2: all of it, from 8 -> 16 = max_tokens: ends by length
                 list(range(6)),  # 3: 6, with a stop id among the new tokens
                 list(range(2))]  # 4: 2, with a stop string: only the exact check may say
    slots = []
    for i, positions in enumerate(committed):
        canvases.base[i], canvases.canvas_start[i], canvases.canvas_end[i] = 20 * i, 4, 20
        canvases.block_size[i] = 8
        canvases.committed[20 * i:20 * i + 4] = True
        canvases.committed[20 * i + 4 + np.array(positions, np.int64)] = True
        canvases.tokens[20 * i + 4:20 * i + 20] = 10 + np.arange(16)
        slots.append(i)
    canvases.tokens[60 + 4 + 4] = 99  # request 3's answer position 4
    requests = [_Request(0, 0, 16), _Request(0, 0, 16), _Request(8, 8, 16), _Request(2, 2, 16),
                _Request(0, 0, 16, stop=("x",))]
    for i, r in enumerate(requests):  # the columns the finish checks read, as Canvases.adopt writes them
        canvases.max_tokens[i], canvases.stop_strings[i] = r.params.max_tokens, bool(r.params.stop)
    scan = scan_answers(canvases, np.array(slots), requests, frozenset({99}))
    assert scan.found.all()
    assert scan.length.tolist() == [3, 3, 16, 6, 2]
    assert scan.grew.tolist() == [True, True, True, True, True]
    assert scan.quiet.tolist() == [True, True, False, False, False]
    # A frontier still moving past the scanned span (the widest block plus one) is not found.
    canvases.committed[4:20] = True
    late = scan_answers(canvases, np.array([0]), [_Request(0, 0, 16)], frozenset())
    assert not late.found[0]
