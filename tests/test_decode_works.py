"""A step's decode works built at once (CacheScheme.decode_works) equal the scheme's
decode_work request by request, leads and shifted rows included."""

import random
from types import SimpleNamespace

import pytest

from optimus.core.params import SamplingParams
from optimus.core.plan import RequestWork
from optimus.core.request import Request, make_geometry
from optimus.models.spec import AttentionKind
from optimus.scheduler.cache_schemes import PrefixBlock


def _fields(w: RequestWork) -> tuple:
    return (w.request, w.start, w.end, w.store_end, w.groups, w.window, w.final, w.visible, w.refresh)


@pytest.mark.parametrize("attention,shift,suffix", [(AttentionKind.BLOCK_CAUSAL, False, 0),
                                                    (AttentionKind.FULL, False, 0),
                                                    (AttentionKind.FULL, True, 0),
                                                    (AttentionKind.FULL, False, 3),
                                                    (AttentionKind.CAUSAL, True, 0)])
def test_decode_works_equal_each_requests_decode_work(attention, shift, suffix):
    rng = random.Random(0)
    spec = SimpleNamespace(attention=attention, logit_shift=shift)
    scheme = PrefixBlock(attention, suffix)
    requests, windows, leads = [], [], {}
    for i in range(12):
        prompt = rng.randint(1, 20)
        r = Request(str(i), tuple(range(1, prompt + 1)), SamplingParams(max_tokens=24),
                    make_geometry(spec, 8, prompt, 24), mask_id=0)
        r.cache_len = r.geometry.prefill_len + rng.randint(0, 6)
        lo, end = r.window_bounds()
        windows.append((lo, lo + rng.randint(1, end - lo)))
        if i % 3 == 0:  # a finished window's store runs first
            leads[r.request_id] = RequestWork(r, r.cache_len - 2, r.cache_len, r.cache_len, [0, 0], None)
        requests.append(r)
    ensure = lambda r, n, preempt: True  # noqa: E731 - pages are never short here
    expected = [scheme.decode_work(r, leads.get(r.request_id), w, ensure) for r, w in zip(requests, windows)]
    assert [_fields(w) for w in scheme.decode_works(requests, leads, windows, ensure)] == [_fields(w) for w in expected]


@pytest.mark.parametrize("attention,shift", [(AttentionKind.BLOCK_CAUSAL, False), (AttentionKind.FULL, True)])
def test_decode_columns_equal_decode_works_and_their_columns(attention, shift):
    """The scheduler's array path: the same works as decode_works, and columns equal to those
    read off the works (WorkColumns.of)."""
    import numpy as np

    from optimus.core.canvases import Canvases
    from optimus.core.plan import WorkColumns

    rng = random.Random(1)
    spec = SimpleNamespace(attention=attention, logit_shift=shift)
    scheme, canvases = PrefixBlock(attention), Canvases()
    requests, windows, leads = [], [], {}
    for i in range(20):
        prompt = rng.randint(1, 20)
        r = Request(str(i), tuple(range(1, prompt + 1)), SamplingParams(max_tokens=24),
                    make_geometry(spec, 8, prompt, 24), mask_id=0)
        canvases.adopt(r)
        r.cache_len = r.geometry.prefill_len + rng.randint(0, 6)
        lo, end = r.window_bounds()
        windows.append((lo, lo + rng.randint(1, end - lo)))
        if i % 3 == 0:
            leads[r.request_id] = RequestWork(r, r.cache_len - 2, r.cache_len, r.cache_len, [0, 0], None)
        requests.append(r)
    pairs = list(zip(requests, windows))
    rng.shuffle(pairs)  # slots out of order
    requests, windows = [r for r, _ in pairs], [w for _, w in pairs]
    slots = canvases.slots(requests)
    cache_len = np.array([r.cache_len for r in requests], np.int64)
    lo, hi = (np.array(x, np.int64) for x in zip(*windows))
    shifts = np.array([r.geometry.shift for r in requests], np.int64)
    works, columns = scheme.decode_columns(requests, leads, slots, cache_len, lo, hi, shifts)
    expected = scheme.decode_works(requests, leads, windows, None)
    assert [_fields(w) for w in works] == [_fields(w) for w in expected]
    read = WorkColumns.of(expected)
    for name in WorkColumns.__dataclass_fields__:
        assert np.array_equal(getattr(columns, name), getattr(read, name)), name
    stranger = Request("x", (1,), SamplingParams(max_tokens=8), make_geometry(spec, 8, 1, 8), mask_id=0)
    canvases.adopt(stranger)  # a lead whose request is not planned: no array path
    assert scheme.decode_columns(requests, {"x": RequestWork(stranger, 0, 1, 1, [0], None)}, slots, cache_len,
                                 lo, hi, shifts) is None
