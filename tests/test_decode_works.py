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
