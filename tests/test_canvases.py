"""Canvases: adopted requests' canvases live in shared arrays (views of them), keep their
contents through compaction and slot growth, and get arrays of their own back on release."""

import numpy as np
import pytest

from optimus.core.canvases import Canvases
from optimus.core.params import SamplingParams
from optimus.core.request import Geometry, Request


def _request(rid: str, prompt_len: int, canvas_end: int) -> Request:
    g = Geometry(block_size=4, block_origin=0, shift=0, prefill_len=prompt_len, canvas_start=prompt_len,
                 canvas_end=canvas_end)
    return Request(rid, tuple(range(1, prompt_len + 1)), SamplingParams(max_tokens=canvas_end - prompt_len), g,
                   mask_id=99)


def _expected(r: Request) -> tuple[np.ndarray, np.ndarray]:
    """What r's canvas holds in these tests: its prompt, then every third position committed."""
    n = r.geometry.canvas_end
    tokens = np.full(n, 99, np.int64)
    tokens[:len(r.prompt_ids)] = r.prompt_ids
    committed = np.arange(n) < len(r.prompt_ids)
    for p in range(len(r.prompt_ids), n, 3):
        tokens[p], committed[p] = 1000 + p, True
    return tokens, committed


def test_adopted_canvases_keep_their_contents_through_compaction_and_release():
    canvases = Canvases(capacity=16, slots=1)  # every adoption below compacts or grows
    requests = [_request(f"r{i}", 3 + i, 12 + 4 * i) for i in range(6)]
    for r in requests:
        canvases.adopt(r)
        for p in range(len(r.prompt_ids), r.geometry.canvas_end, 3):  # written through the views
            r.tokens[p], r.committed[p] = 1000 + p, True
    canvases.release(requests[2])
    canvases.release(requests[4])
    canvases.adopt(_request("late", 5, 40))  # reuses a freed slot; compacts past the freed spans
    assert len(canvases) == 5
    for r in requests:
        tokens, committed = _expected(r)
        np.testing.assert_array_equal(r.tokens, tokens)
        np.testing.assert_array_equal(r.committed, committed)
        adopted = r.slot >= 0
        assert adopted == (r not in (requests[2], requests[4]))
        assert (r.tokens.base is canvases.tokens) == adopted  # released: arrays of its own
        if adopted:  # the columns the step plan reads
            s, g = r.slot, r.geometry
            start = int(canvases.base[s])
            np.testing.assert_array_equal(canvases.tokens[start:start + g.canvas_end], tokens)
            assert (canvases.canvas_start[s], canvases.canvas_end[s], canvases.block_size[s]) == \
                   (g.canvas_start, g.canvas_end, g.block_size)
    assert canvases.slots(requests[:2]).tolist() == [r.slot for r in requests[:2]]
    assert canvases.slots(requests[:3]) is None  # one released: the per-request paths apply


def test_adopt_and_release_are_idempotent():
    canvases = Canvases(capacity=64)
    r = _request("r", 4, 16)
    canvases.adopt(r)
    view = r.tokens
    canvases.adopt(r)
    assert r.tokens is view and len(canvases) == 1
    canvases.release(r)
    canvases.release(r)
    assert r.slot == -1 and len(canvases) == 0
    other = Canvases()
    other.release(r)  # never adopted there: nothing happens
    assert r.slot == -1
    canvases.adopt(r)
    with pytest.raises(ValueError, match="another scheduler"):
        other.adopt(r)
    other.release(r)  # not its own: nothing happens
    assert r.tokens.base is canvases.tokens


def test_windows_on_the_columns_match_each_requests_own():
    """window_bounds and plan_windows over many requests at once equal Request.window_bounds
    and Request.plan_window one by one: shifts, block origins, cursors in and at the end of
    blocks, committed starts (a window stretched to its first masked position)."""
    import random
    rng = random.Random(0)
    canvases = Canvases(capacity=64, slots=2)
    requests = []
    for i in range(60):
        prompt, block, shift = rng.randrange(1, 12), rng.choice((1, 4, 8)), rng.choice((0, 1))
        origin = rng.choice((0, prompt))
        end = origin + -(-(prompt + rng.randrange(1, 40) - origin) // block) * block
        g = Geometry(block, origin, shift, prompt - shift, prompt, end)
        r = Request(f"r{i}", tuple(range(1, prompt + 1)), SamplingParams(max_tokens=end - prompt), g, mask_id=0)
        canvases.adopt(r)
        r.committed[prompt:] = [rng.random() < 0.6 for _ in range(end - prompt)]
        r.cache_len = rng.randrange(0, end)
        requests.append(r)
    slots = np.array([r.slot for r in requests])
    lo, end = canvases.window_bounds(slots, np.array([r.cache_len for r in requests]))
    assert list(zip(lo.tolist(), end.tolist())) == [r.window_bounds() for r in requests]
    live = [i for i, r in enumerate(requests) if lo[i] < end[i]]  # the scheduler plans these only
    chunks = np.array([rng.choice((1, 2, 3, 5, 8)) for _ in live])
    hi = canvases.plan_windows(slots[live], lo[live], end[live], chunks)
    expected = [requests[i].plan_window(int(c)) for i, c in zip(live, chunks)]
    assert list(zip(lo[live].tolist(), hi.tolist())) == expected
    assert sum(h - a > c for (a, h), c in zip(expected, chunks)) > 0  # some windows stretched
