"""Refresh waves: a due cache refresh waits for others to fill a step, boundedly."""

from types import SimpleNamespace

import numpy as np
import pytest

from optimus.core.params import SamplingParams
from optimus.engine.llm import LLM
from optimus.reference import fast_dllm
from optimus.scheduler.refresh_waves import RefreshWaves
from fixtures.engine import tiny_loaded

REFRESH = 100  # rows of one refresh


def _decoders(n, left=1):
    """``left``: masked positions each has left in its block of 8 (1: all about to be due)."""
    committed = np.arange(8) >= left
    return [SimpleNamespace(request_id=str(i), window_bounds=lambda: (0, 8), committed=committed) for i in range(n)]


def _rows(due):
    return lambda r: REFRESH if r.request_id in due else 0


def test_a_lone_due_refresh_waits_at_most_max_wait_steps():
    waves, decoders = RefreshWaves(max_wait=3, min_decoders=0), _decoders(4)
    held = [waves.held(decoders, _rows({"0"}), budget=1000) for _ in range(4)]
    assert held == [{"0"}, {"0"}, {"0"}, frozenset()]  # due since step 1: released at step 4


def test_a_full_wave_goes_at_once():
    waves, decoders = RefreshWaves(max_wait=8, min_decoders=0), _decoders(12)
    # 9 refreshes of 100 rows: a tenth would not fit beside the other 3 decoders' rows
    assert waves.held(decoders, _rows({str(i) for i in range(9)}), budget=1000) == frozenset()
    assert waves.held(decoders, _rows({str(i) for i in range(5)}), budget=1000) == {str(i) for i in range(5)}


def test_never_held_when_every_decoder_is_due_off_or_below_min_decoders():
    decoders = _decoders(3)
    assert RefreshWaves(max_wait=8, min_decoders=0).held(decoders, _rows({"0", "1", "2"}), budget=1000) == frozenset()
    assert RefreshWaves(max_wait=0, min_decoders=0).held(decoders, _rows({"0"}), budget=1000) == frozenset()
    assert RefreshWaves(max_wait=8, min_decoders=4).held(decoders, _rows({"0"}), budget=1000) == frozenset()
    assert RefreshWaves(max_wait=8, min_decoders=3).held(decoders, _rows({"0"}), budget=1000) == {"0"}


def test_not_held_when_no_other_decoder_is_near_its_block_end():
    waves = RefreshWaves(max_wait=2, min_decoders=0)
    assert waves.held(_decoders(3, left=5), _rows({"0"}), budget=1000) == frozenset()  # due in > 4 steps
    assert waves.held(_decoders(3, left=4), _rows({"0"}), budget=1000) == {"0"}


def test_the_wait_restarts_once_a_request_has_refreshed():
    waves, decoders = RefreshWaves(max_wait=2, min_decoders=0), _decoders(3)
    waves.held(decoders, _rows({"0"}), budget=1000)
    waves.held(decoders, _rows(set()), budget=1000)  # "0" refreshed (released elsewhere)
    assert waves.held(decoders, _rows({"0"}), budget=1000) == {"0"}  # due anew: a fresh wait


def test_steps_below_min_decoders_do_not_count_as_waiting():
    waves, few, many = RefreshWaves(max_wait=2, min_decoders=3), _decoders(2), _decoders(3)
    assert [waves.held(many, _rows({"0"}), budget=1000) for _ in range(2)] == [{"0"}, {"0"}]
    assert waves.held(few, _rows({"0"}), budget=1000) == frozenset()  # too few decoders: it refreshes now
    assert waves.held(many, _rows({"0"}), budget=1000) == {"0"}  # due again later: a fresh wait


PROMPTS = [[5, 9, 13], [3] * 11, list(range(20, 37)), [7]]


@pytest.fixture(scope="module")
def llada():
    return tiny_loaded("llada")


@pytest.mark.parametrize("mode", ["dual-cache", "prefix-cache"])
def test_held_refreshes_keep_the_published_tokens(llada, mode):
    """Holding a refresh moves it to a later step, never changes what a request decodes: at
    C = block every request still equals Fast-dLLM's loop, and refreshes were held (two
    requests commit 2 positions a step, two 1, so the first two wait for the others)."""
    block, gen = 8, 16
    reference = {"dual-cache": fast_dllm.generate_with_dual_cache,
                 "prefix-cache": fast_dllm.generate_with_prefix_cache}[mode]
    per_step = [2, 1, 2, 1]
    want = [reference(llada.model, [p], steps=gen // k, gen_length=gen, block_length=block).generated[0].tolist()
            for p, k in zip(PROMPTS, per_step)]
    llm = LLM(loaded=llada, policy=f"fixed:{block}", device="cpu", block_size=block, cache_mode=mode,
              num_pages=512, page_size=4, refresh_wave_wait=3, refresh_wave_min_decoders=0)
    waves = llm.engine.scheduler.refresh_waves
    held_any = []
    inner = waves.held
    waves.held = lambda *a, **kw: held_any.append(bool(r := inner(*a, **kw))) or r
    params = [SamplingParams(max_tokens=gen, rule="topk", tokens_per_step=k, ignore_eos=True) for k in per_step]
    assert [list(o.token_ids) for o in llm.generate(PROMPTS, params)] == want
    assert any(held_any)
