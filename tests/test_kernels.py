"""Paged KV write and ragged group attention: reference vs dense loops, Triton vs reference."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from optimus.kernels import group_attention, visible_key_end, write_kv
from optimus.kernels.reference import group_attention_reference


@dataclass(frozen=True)
class Case:
    """A ragged step plus the dense per-request tensors it was built from."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    page_table: torch.Tensor
    cache_lens: torch.Tensor
    cu_q: torch.Tensor
    groups: torch.Tensor
    dense_k: list[torch.Tensor]  # per request [cache_len, Hkv, D]
    dense_v: list[torch.Tensor]


def make_case(specs: list[tuple[int, list[int]]], hq: int, hkv: int, d: int, page_size: int,
              dtype: torch.dtype = torch.float32, seed: int = 0) -> Case:
    """specs: per request (cache_len, groups of its new rows). Pages are shuffled."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    need = [math.ceil(c / page_size) for c, _ in specs]
    num_pages = sum(need) + 3
    k_cache, v_cache = rand(num_pages, page_size, hkv, d), rand(num_pages, page_size, hkv, d)
    perm = torch.randperm(num_pages, generator=gen)
    max_pages = max(need + [1]) + 1
    page_table = torch.full((len(specs), max_pages), -1, dtype=torch.int32)
    dense_k, dense_v, used = [], [], 0
    for r, (c, _) in enumerate(specs):
        pages = perm[used:used + need[r]]
        used += need[r]
        page_table[r, :need[r]] = pages.to(torch.int32)
        dense_k.append(k_cache[pages].reshape(-1, hkv, d)[:c].clone())
        dense_v.append(v_cache[pages].reshape(-1, hkv, d)[:c].clone())
    lens = [len(g) for _, g in specs]
    t = sum(lens)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    groups = torch.tensor([g for _, gs in specs for g in gs], dtype=torch.int32)
    return Case(rand(t, hq, d), rand(t, hkv, d), rand(t, hkv, d), k_cache, v_cache, page_table,
                torch.tensor([c for c, _ in specs], dtype=torch.int32), cu, groups, dense_k, dense_v)


def dense_loop(case: Case, scale: float | None = None) -> torch.Tensor:
    """Row-by-row float64 softmax over an explicitly listed key set: the simplest statement."""
    t, hq, d = case.q.shape
    rep = hq // case.k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(t, hq, d, dtype=torch.float64)
    cu = case.cu_q.tolist()
    for r in range(len(cu) - 1):
        for i in range(cu[r], cu[r + 1]):
            seen = [j for j in range(cu[r], cu[r + 1]) if case.groups[j] <= case.groups[i]]
            keys = torch.cat([case.dense_k[r], case.k[seen]]).double()
            vals = torch.cat([case.dense_v[r], case.v[seen]]).double()
            for h in range(hq):
                s = keys[:, h // rep] @ case.q[i, h].double() * scale
                out[i, h] = torch.softmax(s, 0) @ vals[:, h // rep]
    return out


def run(case: Case, backend: str, scale: float | None = None) -> torch.Tensor:
    return group_attention(case.q, case.k, case.v, case.k_cache, case.v_cache, case.page_table,
                           case.cache_lens, case.cu_q, case.groups, scale=scale, backend=backend)


MIXED = [
    (0, [0, 1, 2, 3, 4]),  # causal prefill, empty cache
    (5, [0, 0, 1, 1, 1]),  # decode: finished chunk (group 0) + active chunk (group 1)
    (8, [7]),  # single token
    (3, [0, 0, 0, 1, 1, 1, 1]),  # block-causal, partial page cache
]


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1)])
def test_reference_matches_dense_loop(hq: int, hkv: int) -> None:
    case = make_case(MIXED, hq, hkv, 8, page_size=4, seed=hq + hkv)
    got = group_attention_reference(case.q, case.k, case.v, case.k_cache, case.v_cache,
                                    case.page_table, case.cache_lens, case.cu_q, case.groups)
    torch.testing.assert_close(got.double(), dense_loop(case), atol=1e-5, rtol=1e-5)


def test_reference_custom_scale_and_half_precision() -> None:
    case = make_case(MIXED, 4, 2, 16, page_size=2, dtype=torch.bfloat16, seed=3)
    got = run(case, "torch", scale=0.3)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), dense_loop(case, scale=0.3), atol=2e-2, rtol=2e-2)


def test_group_mask_changes_result() -> None:
    """Same tokens, different groups: the first row must see more keys when grouped together."""
    causal = make_case([(2, [0, 1, 2])], 2, 2, 8, page_size=4, seed=5)
    together = Case(**{**causal.__dict__, "groups": torch.zeros(3, dtype=torch.int32)})
    a, b = run(causal, "torch"), run(together, "torch")
    torch.testing.assert_close(a[2], b[2])  # the last row sees everything either way
    assert not torch.allclose(a[0], b[0])
    torch.testing.assert_close(b.double(), dense_loop(together), atol=1e-5, rtol=1e-5)


def test_write_kv_skips_negative_slots() -> None:
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8)
    k, v = torch.randn(5, 2, 8, generator=gen), torch.randn(5, 2, 8, generator=gen)
    slots = torch.tensor([9, -1, 0, 4, -1])
    write_kv(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(12, 2, 8), v_cache.view(12, 2, 8)
    for row, slot in [(0, 9), (2, 0), (3, 4)]:
        torch.testing.assert_close(flat_k[slot], k[row])
        torch.testing.assert_close(flat_v[slot], v[row])
    untouched = [s for s in range(12) if s not in (9, 0, 4)]
    assert flat_k[untouched].abs().sum() == 0 and flat_v[untouched].abs().sum() == 0


def test_write_then_attend_equals_attending_to_new_rows() -> None:
    """Storing a group-0 chunk and reading it back as cache gives the same attention."""
    case = make_case([(4, [0, 0, 0, 1, 1])], 4, 2, 8, page_size=4, seed=7)
    before = run(case, "torch")
    # Move the three group-0 rows into the cache at positions 4..6 (page 1 of the request).
    page = int(case.page_table[0, 0])
    spare = [p for p in range(case.k_cache.shape[0]) if p not in case.page_table[0].tolist()][0]
    table = case.page_table.clone()
    table[0, 1] = spare
    slots = torch.tensor([spare * 4 + o for o in range(3)] + [-1, -1])
    k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
    write_kv(case.k, case.v, k_cache, v_cache, slots)
    after = group_attention(case.q[3:], case.k[3:], case.v[3:], k_cache, v_cache, table,
                            torch.tensor([7], dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32),
                            torch.tensor([1, 1], dtype=torch.int32), backend="torch")
    assert page != spare
    torch.testing.assert_close(after, before[3:], atol=1e-5, rtol=1e-5)


def test_rejects_bad_shapes() -> None:
    case = make_case(MIXED, 4, 2, 8, page_size=4)
    with pytest.raises(ValueError):
        group_attention(case.q, case.k[:, :1].expand(-1, 3, -1), case.v[:, :1].expand(-1, 3, -1),
                        case.k_cache, case.v_cache, case.page_table, case.cache_lens, case.cu_q,
                        case.groups)
    with pytest.raises(ValueError):
        run(case, "cuda-magic")


# ---- Triton kernels: on CUDA when present, else the Triton interpreter on CPU (slow: tiny shapes).

@pytest.fixture(scope="module")
def triton_env(triton_device):
    """(group-attention module, kv-write module, device)."""
    from optimus.kernels import _group_attention_triton, _kv_write_triton

    return _group_attention_triton, _kv_write_triton, triton_device


def _to(case: Case, device: str) -> Case:
    return Case(**{f: (x.to(device) if isinstance(x, torch.Tensor) else x) for f, x in case.__dict__.items()})


def _triton(ga, case: Case, **kw) -> torch.Tensor:
    return ga.group_attention_triton(case.q, case.k, case.v, case.k_cache, case.v_cache,
                                     case.page_table, case.cache_lens, case.cu_q, case.groups, **kw)


TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype,hq,hkv,d", [
    (torch.float32, 4, 2, 16),
    (torch.float16, 6, 2, 24),  # GQA 3 (padded head packing), head dim not a power of two
    (torch.bfloat16, 2, 2, 8),
])
def test_triton_matches_reference_mixed(triton_env, dtype, hq, hkv, d) -> None:
    ga, _, dev = triton_env
    if dev == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton 3.9's interpreter computes tl.dot on bf16 operands wrongly (a bare "
                    "bf16 x bf16^T dot is off by 1e10); bf16 is checked on CUDA only")
    case = _to(make_case(MIXED, hq, hkv, d, page_size=4, dtype=dtype, seed=11), dev)
    want = run(case, "torch")
    got = _triton(ga, case)
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_triton_multi_tile_ragged(triton_env) -> None:
    """Lengths that are not tile multiples: several query tiles and key tiles per request."""
    ga, _, dev = triton_env
    specs = [(0, list(range(19))),  # causal prefill longer than a tile
             (21, [0] * 3 + [1] * 6),  # cache spanning a partial page, decode step
             (37, [2] * 17 + [3] * 5)]  # block-causal tail, groups not starting at 0
    case = _to(make_case(specs, 4, 1, 16, page_size=8, seed=13), dev)
    cfg = ga.TileConfig(block_q=4, block_n=16, num_warps=4, num_stages=1)
    got = _triton(ga, case, config=cfg)
    torch.testing.assert_close(got, run(case, "torch"), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got.double().cpu(), dense_loop(_to(case, "cpu")), atol=2e-5, rtol=2e-5)


def random_specs(seed: int, num_req: int) -> list[tuple[int, list[int]]]:
    """Random ragged step: cache lengths incl. 0, chunk lengths incl. 0, mixed group shapes."""
    gen = torch.Generator().manual_seed(seed)
    pick = lambda n: int(torch.randint(n, (1,), generator=gen))  # noqa: E731
    specs = []
    for _ in range(num_req):
        cache, n = pick(3) * pick(13), pick(11)
        shape = pick(3)
        if shape == 0:  # causal
            groups = [cache + i for i in range(n)]
        elif shape == 1:  # block-causal with block 4, aligned to absolute positions
            groups = [(cache + i) // 4 for i in range(n)]
        else:  # decode: finished chunk + active chunk
            split = pick(n + 1)
            groups = [0] * split + [1] * (n - split)
        specs.append((cache, groups))
    return specs


@pytest.mark.parametrize("seed", [0, 1])
def test_triton_random_ragged(triton_env, seed) -> None:
    ga, _, dev = triton_env
    specs = random_specs(seed, 5)
    specs[0] = (specs[0][0], specs[0][1] or [0])  # at least one row in the step
    case = _to(make_case(specs, 4, 2, 16, page_size=4, seed=seed), dev)
    got = _triton(ga, case, max_q_len=max(len(g) for _, g in specs),
                  key_end=visible_key_end(case.cu_q, case.groups))
    torch.testing.assert_close(got, run(case, "torch"), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("splits", [1, 4])
def test_stale_nan_in_unused_cache_slots_is_ignored(triton_env, splits) -> None:
    """Reused pages hold garbage past a request's cache length; it must not leak into outputs."""
    ga, _, dev = triton_env
    cfg = ga.TileConfig(block_q=4, block_n=16, num_warps=4, num_stages=1, num_splits=splits)
    case = make_case([(5, [0, 1]), (2, [0, 0, 0])], 4, 2, 16, page_size=4, seed=17)
    want = run(case, "torch")
    k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
    for r, c in enumerate(case.cache_lens.tolist()):
        page, start = int(case.page_table[r, c // 4]), c % 4
        k_cache[page, start:], v_cache[page, start:] = float("nan"), float("inf")
    poisoned = _to(Case(**{**case.__dict__, "k_cache": k_cache, "v_cache": v_cache}), dev)
    torch.testing.assert_close(run(poisoned, "torch").cpu(), want)
    torch.testing.assert_close(_triton(ga, poisoned, config=cfg).cpu(), want, atol=2e-5, rtol=2e-5)


def test_tile_configs_are_valid_triton_shapes(triton_env) -> None:
    """tl.arange needs powers of two; tl.dot needs M >= 16 rows (BLOCK_Q x padded GQA)."""
    ga = triton_env[0]
    for max_q in (1, 3, 4, 17, 32, 100, 1024):
        for gqa_pad in (1, 2, 4, 8, 32):
            for parallel in (1, 8, 64, 4096):
                cfg = ga.choose_config(max_q, gqa_pad, 128, parallel)
                m = cfg.block_q * gqa_pad
                for size in (cfg.block_q, cfg.block_n, cfg.num_splits):
                    assert size & (size - 1) == 0, (max_q, gqa_pad, parallel, cfg)
                assert 16 <= m <= max(128, gqa_pad), (max_q, gqa_pad, parallel, cfg)
                assert 1 <= cfg.num_splits <= ga.MAX_SPLITS


# ---- split-KV (flash-decoding): several programs per (query tile, KV head), then a combine.

# Cache lengths around the split boundaries with block_n=16: 0; shorter than the number of
# splits (3, 5); not BLOCK_N multiples (21, 37, 70), so some splits are partial or empty.
SPLIT_SPECS = [
    (0, list(range(6))),  # no cache: every split but the last is empty
    (3, [0, 0, 1]),
    (70, [4] * 3 + [5] * 6),  # decode step, 70 = 4 full 16-key steps + 6
    (21, []),  # a request with no rows this step
    (37, [2] * 17 + [3] * 5),  # several query tiles (block_q 4)
    (5, [9]),
]


@pytest.mark.parametrize("splits", [1, 2, 4, 8])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 4)])  # GQA, MHA
def test_triton_split_kv_matches_reference(triton_env, splits, hq, hkv) -> None:
    ga, _, dev = triton_env
    case = _to(make_case(SPLIT_SPECS, hq, hkv, 16, page_size=4, seed=splits + hq * hkv), dev)
    cfg = ga.TileConfig(block_q=4, block_n=16, num_warps=4, num_stages=1, num_splits=splits)
    got = _triton(ga, case, config=cfg, max_q_len=22)
    torch.testing.assert_close(got, run(case, "torch"), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("seed,splits", [(2, 2), (3, 8)])
def test_triton_split_kv_random_ragged(triton_env, seed, splits) -> None:
    ga, _, dev = triton_env
    specs = random_specs(seed, 4) + [(0, [0])]  # at least one row in the step
    case = _to(make_case(specs, 6, 2, 8, page_size=4, seed=seed), dev)  # GQA 3 (padded)
    cfg = ga.TileConfig(block_q=2, block_n=16, num_warps=4, num_stages=1, num_splits=splits)
    got = _triton(ga, case, config=cfg, key_end=visible_key_end(case.cu_q, case.groups))
    torch.testing.assert_close(got, run(case, "torch"), atol=2e-5, rtol=2e-5)


def test_triton_split_kv_half_precision(triton_env) -> None:
    """fp16 in, fp32 partials, one rounding at the combine: as close as the unsplit kernel."""
    ga, _, dev = triton_env
    case = _to(make_case(SPLIT_SPECS, 6, 2, 24, page_size=4, dtype=torch.float16, seed=19), dev)
    cfg = ga.TileConfig(block_q=4, block_n=16, num_warps=4, num_stages=1, num_splits=4)
    got = _triton(ga, case, config=cfg)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), run(case, "torch").float(), atol=2e-3, rtol=2e-3)


def test_split_kv_same_config_any_cache_length(triton_env) -> None:
    """One config (as in one CUDA graph) stays right as the device-side cache lengths change."""
    ga, _, dev = triton_env
    case = _to(make_case([(45, [0, 0, 1]), (30, [1, 2])], 4, 2, 16, page_size=4, seed=23), dev)
    cfg = ga.TileConfig(block_q=4, block_n=16, num_warps=4, num_stages=1, num_splits=4)
    for lens in ([45, 30], [0, 17], [2, 1]):
        step = Case(**{**case.__dict__, "cache_lens": torch.tensor(lens, dtype=torch.int32, device=dev)})
        torch.testing.assert_close(_triton(ga, step, config=cfg, max_q_len=3), run(step, "torch"),
                                   atol=2e-5, rtol=2e-5)


def test_split_heuristic(triton_env) -> None:
    """Batch 1 (grid far below ~100 programs even at M=16) splits; large grids do not."""
    ga = triton_env[0]
    cases = {"llama decode": (1, 4, 8),  # (max_q_len, padded GQA, requests x KV heads)
             "sdar chunk 4": (4, 4, 8), "sdar chunk 32": (32, 4, 8), "llada chunk 32": (32, 1, 32)}
    for name, (max_q, gqa_pad, parallel) in cases.items():
        cfg = ga.choose_config(max_q, gqa_pad, 128, parallel)
        programs = -(-max_q // cfg.block_q) * parallel
        rows = cfg.block_q * gqa_pad
        assert cfg.num_splits > 1 and programs * cfg.num_splits >= 100, (name, cfg)
        assert programs * rows * cfg.num_splits <= ga.MAX_PARTIAL_ROWS, (name, cfg)
        assert rows >= min(16 * -(-max_q * gqa_pad // 16), 64), (name, cfg)  # no halving
    for max_q, gqa_pad, parallel in ((1, 4, 128 * 8), (32, 1, 32 * 32), (1024, 4, 8), (32, 4, 64)):
        assert ga.choose_config(max_q, gqa_pad, 128, parallel).num_splits == 1
    assert ga.choose_config(1, 32, 128, parallel=1).num_splits == ga.MAX_SPLITS
    assert ga.choose_config(32, 4, 128, 8, split_kv=False) == ga.TileConfig(4, 64, 4, 2)  # before
    assert ga.choose_splits(100, 16, min_programs=100) == 2  # aims at 2 programs per SM-ish
    assert ga.choose_splits(16, 64, min_programs=100) == 8  # partial-row cap (8192)


def test_split_kv_rejects_non_power_of_two(triton_env) -> None:
    ga, _, dev = triton_env
    case = _to(make_case([(5, [0])], 2, 2, 8, page_size=4), dev)
    with pytest.raises(ValueError, match="power of two"):
        _triton(ga, case, config=ga.TileConfig(4, 16, 4, 1, num_splits=3))


def test_visible_key_end() -> None:
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)  # the middle request has no new rows
    groups = torch.tensor([0, 0, 1, 5, 5, 6, 9], dtype=torch.int32)
    assert visible_key_end(cu, groups).tolist() == [2, 2, 3, 5, 5, 6, 7]


def test_triton_write_kv(triton_env) -> None:
    _, kw, dev = triton_env
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(6, 3, 8, generator=gen), torch.randn(6, 3, 8, generator=gen)
    slots = torch.tensor([5, -1, 0, 11, -1, 7])
    want_k, want_v = torch.zeros(3, 4, 3, 8), torch.zeros(3, 4, 3, 8)
    write_kv(k, v, want_k, want_v, slots)
    got_k, got_v = torch.zeros(3, 4, 3, 8, device=dev), torch.zeros(3, 4, 3, 8, device=dev)
    kw.write_kv_triton(k.to(dev), v.to(dev), got_k, got_v, slots.to(dev))
    assert torch.equal(got_k.cpu(), want_k) and torch.equal(got_v.cpu(), want_v)


# ---- cache-only attention (dual cache: the step's rows were written to the cache first)

CACHE_ONLY_SPECS = [(9, [1] * 4), (5, [1, 1]), (21, [1] * 7)]


def _cache_only_dense(case: Case) -> torch.Tensor:
    """Each row attends to its request's cached keys alone (float64 softmax)."""
    t, hq, d = case.q.shape
    rep = hq // case.k.shape[1]
    out = torch.zeros(t, hq, d, dtype=torch.float64)
    cu = case.cu_q.tolist()
    for r in range(len(cu) - 1):
        keys, vals = case.dense_k[r].double(), case.dense_v[r].double()
        for i in range(cu[r], cu[r + 1]):
            for h in range(hq):
                s = keys[:, h // rep] @ case.q[i, h].double() / math.sqrt(d)
                out[i, h] = torch.softmax(s, 0) @ vals[:, h // rep]
    return out


def test_cache_only_reference_ignores_new_rows() -> None:
    case = make_case(CACHE_ONLY_SPECS, 4, 2, 8, page_size=4, seed=5)
    got = group_attention(case.q, case.k, case.v, case.k_cache, case.v_cache, case.page_table, case.cache_lens,
                          case.cu_q, case.groups, backend="torch", cache_only=True)
    torch.testing.assert_close(got.double(), _cache_only_dense(case), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, run(case, "torch"))  # the new rows do change ordinary attention


@pytest.mark.parametrize("splits", [1, 4])
def test_triton_cache_only_matches_reference(triton_env, splits) -> None:
    ga, _, dev = triton_env
    from optimus.kernels import request_start_rows

    case = _to(make_case(CACHE_ONLY_SPECS, 4, 2, 16, page_size=4, seed=6), dev)
    cfg = ga.TileConfig(block_q=4, block_n=16, num_warps=4, num_stages=1, num_splits=splits)
    got = _triton(ga, case, config=cfg, key_end=request_start_rows(case.cu_q, case.q.shape[0]))
    want = group_attention_reference(case.q, case.k, case.v, case.k_cache, case.v_cache, case.page_table,
                                     case.cache_lens, case.cu_q, case.groups, cache_only=True)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
