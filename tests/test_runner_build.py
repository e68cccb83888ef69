"""ModelRunner.build against a straightforward per-row reference: every array of the StepBatch
(dtype, shape, values) and the LogitRequests, over mixed plans and over step sequences whose
page lists grow, are replaced (preemption), reorder, come and go (the page table reuses the
rows of the step before)."""

import random

import numpy as np
import pytest
import torch

from optimus.core.canvases import Canvases
from optimus.core.params import SamplingParams
from optimus.core.plan import RequestWork, StepPlan
from optimus.core.request import Geometry, Request
from optimus.executor.logit_wants import LogitRequest
from optimus.executor.runner import ModelRunner, TokenFeed

PAGE = 4
TOTAL = 40  # positions of every test request's canvas


def _request(rid: str, shift: int, rng: random.Random) -> Request:
    g = Geometry(block_size=4, block_origin=0, shift=shift, prefill_len=3, canvas_start=4, canvas_end=TOTAL)
    r = Request(rid, (1, 2, 3, 4), SamplingParams(max_tokens=TOTAL - 4), g, mask_id=0)
    r.tokens = np.array([rng.randrange(1, 1000) for _ in range(TOTAL)], np.int64)
    r.committed = np.array([rng.random() < 0.4 for _ in range(TOTAL)])
    return r


def _reference(plan: StepPlan, feed: TokenFeed | None = None) -> tuple[dict, list[LogitRequest]]:
    """Row by row, request by request: what build must produce."""
    works = plan.works
    width = max([len(w.request.pages) for w in works] + [1])
    out = {k: [] for k in ("input_ids", "positions", "groups", "slots", "logit_rows")}
    cu, wants = [0], []
    for i, w in enumerate(works):
        r = w.request
        for p in range(w.start, w.end):
            out["input_ids"].append(int(r.tokens[p]))
            out["positions"].append(p)
            out["slots"].append(r.pages[p // PAGE] * PAGE + p % PAGE if p < w.store_end else -1)
        source = feed.sources.get(r.request_id) if feed is not None and w.window is not None else None
        if source is not None and w.start <= source[0] < w.end:
            out["input_ids"][cu[-1] + source[0] - w.start] = int(feed.tokens[source[1]])
        out["groups"] += w.row_groups()
        if w.window is not None:
            open_ = [p for p in range(*w.window) if not r.committed[p]]
            if open_:
                wants.append(LogitRequest(i, tuple(open_), len(out["logit_rows"])))
                out["logit_rows"] += [cu[-1] + p - r.geometry.shift - w.start for p in open_]
        cu.append(cu[-1] + w.end - w.start)
    expected = {k: torch.tensor(v, dtype=torch.int32 if k == "groups" else torch.int64).reshape(-1)
                for k, v in out.items()}
    expected["cu_q"] = torch.tensor(cu, dtype=torch.int32)
    expected["cache_lens"] = torch.tensor([w.cached_keys for w in works], dtype=torch.int32).reshape(-1)
    expected["page_table"] = torch.tensor([w.request.pages + [0] * (width - len(w.request.pages)) for w in works],
                                          dtype=torch.int32).reshape(len(works), width)
    expected["max_q_len"] = max([w.end - w.start for w in works], default=1)
    expected["carries_prompt"] = any(w.window is None and not w.refresh for w in works)
    return expected, wants


def _check(runner: ModelRunner, plan: StepPlan, feed: TokenFeed | None = None) -> None:
    batch, wants = runner.build(plan, feed)
    expected, expected_wants = _reference(plan, feed)
    for name, want in expected.items():
        got = getattr(batch, name)
        if isinstance(want, torch.Tensor):
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert torch.equal(got, want), name
        else:
            assert got == want, name
    assert wants == expected_wants
    assert all(type(w) is LogitRequest for w in wants)


def _runner() -> ModelRunner:
    return ModelRunner(None, None, PAGE, torch.device("cpu"))  # build needs neither model nor storage


def test_build_matches_reference_on_a_mixed_plan():
    rng = random.Random(0)
    a, b, c, d, e, f = (_request(rid, shift, rng) for rid, shift in zip("abcdef", (0, 0, 1, 1, 0, 0)))
    a.pages, b.pages, c.pages, d.pages, e.pages, f.pages = [7, 3], [11, 12, 13], [1, 2, 4, 5], [9, 8], [20] * 4, []
    b.committed[8:12] = [False, True, False, False]  # a decode window with a committed position
    c.committed[10:14] = [False, False, True, False]
    f.committed[12:14] = True  # a window with nothing left to predict: no LogitRequest
    works = [
        RequestWork(a, 0, 6, 6, [0] * 6, None),  # a prefill piece
        RequestWork(b, 8, 12, 8, [1] * 4, (8, 12)),  # a diffusion window, rows not stored
        RequestWork(c, 5, 13, 9, [0] * 4 + [1] * 4, (10, 14)),  # a commit group, then a shifted window
        RequestWork(d, 6, 7, 7, [0], (7, 8)),  # causal: stored as it is computed
        RequestWork(e, 8, 12, 12, [1] * 4, (8, 12), final=9, visible=12),  # dual cache: reads the whole canvas
        RequestWork(f, 12, 14, 12, [0, 0], (12, 14)),  # no pages, nothing stored
    ]
    _check(_runner(), StepPlan(works))
    feed = TokenFeed(torch.tensor([500, 600]), {"d": (6, 1), "b": (3, 0)})  # only d's first row is fed
    _check(_runner(), StepPlan(works), feed)
    # Causal, the step before could not store its row: this one recomputes row 6, then runs
    # the fed position 7 (its token still on the device) as its second row.
    g = _request("g", 1, rng)
    g.pages = [30, 31]
    recompute = RequestWork(g, 6, 8, 8, [6, 7], (8, 9))
    batch, _ = _runner().build(StepPlan([recompute]), TokenFeed(torch.tensor([700]), {"g": (7, 0)}))
    assert batch.input_ids.tolist() == [int(g.tokens[6]), 700]
    feed = TokenFeed(torch.tensor([500, 600, 700]), {"d": (6, 1), "g": (7, 2)})
    _check(_runner(), StepPlan(works + [recompute]), feed)
    _check(_runner(), StepPlan([RequestWork(a, 0, 6, 6, [0] * 6, None)]))  # no window at all


def _work(r: Request, rng: random.Random) -> RequestWork:
    """A random work for r: a prefill piece, a (shifted) diffusion window or a causal step."""
    shift = r.geometry.shift
    kind = rng.choice(("prefill", "window", "causal"))
    if kind == "prefill":
        a = rng.randrange(0, 12)
        b = a + rng.randrange(1, 9)
        return RequestWork(r, a, b, b, [0] * (b - a), None)
    if kind == "causal":
        p = rng.randrange(4, TOTAL - 2)
        return RequestWork(r, p, p + 1, p + 1, [0], (p + 1, p + 2) if shift else (p, p + 1))
    lo = rng.randrange(4, TOTAL - 8)
    hi = lo + rng.randrange(1, 8)
    start = rng.randrange(lo - 4, lo - shift + 1)  # a window has a row for each position
    end = hi - shift
    store_end = rng.randrange(start, end + 1)
    cut = rng.randrange(0, end - start + 1)
    visible = rng.choice((None, start + rng.randrange(0, 4)))
    return RequestWork(r, start, end, store_end, [0] * cut + [1] * (end - start - cut), (lo, hi), visible=visible)


@pytest.mark.parametrize("shared", [False, True], ids=["own-arrays", "canvases"])
@pytest.mark.parametrize("seed", range(4))
def test_build_matches_reference_over_steps(seed, shared):
    """Consecutive builds on one runner: page lists grow at their end, are replaced by new lists
    (preemption, sometimes shorter), requests reorder, leave and arrive. ``shared``: the
    requests' canvases live in one small Canvases (it compacts and grows as they are adopted;
    the build reads them with one indexed read), one request of the pool excepted (the build
    falls back to a slice per request when it runs)."""
    rng = random.Random(seed)
    pool = [_request(f"r{i}", rng.choice((0, 1)), rng) for i in range(12)]
    canvases = None
    if shared:
        canvases = Canvases(capacity=2 * TOTAL, slots=2)
        for r in pool[1:]:
            canvases.adopt(r)
        assert all(r.tokens.base is canvases.tokens for r in pool[1:])
    next_page = iter(range(1, 10**6))
    runner, order = _runner(), pool[:6]
    for step in range(40):
        move = rng.random()
        if move < 0.2:
            order = rng.sample(pool, rng.randrange(1, len(pool)))
        elif move < 0.3:
            rng.shuffle(order)
        plan = StepPlan([_work(r, rng) for r in order], canvases)
        for w in plan.works:
            r = w.request
            if rng.random() < 0.1:
                r.pages = []  # preempted: a new list
            need = -(-max(w.end, w.store_end) // PAGE) + rng.randrange(0, 3)
            r.pages.extend(next(next_page) for _ in range(need - len(r.pages)))
            r.committed[rng.randrange(TOTAL)] = True
        feed = None
        if step % 3 == 0:
            feed = TokenFeed(torch.arange(100, 100 + len(order)),
                             {w.request.request_id: (w.start, i) for i, w in enumerate(plan.works)})
        _check(runner, plan, feed)
