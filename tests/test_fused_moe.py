"""Fused MoE: the torch reference against a per-token loop, the Triton kernel against the
reference (CUDA, or CPU under Triton's interpreter at tiny shapes), and its routing layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from optimus.kernels.fused_moe import fused_moe
from optimus.kernels.reference import fused_moe_reference


def make(t: int, k: int, e: int, h: int, inner: int, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=gen).to(dtype)
    w13 = (torch.randn(e, 2 * inner, h, generator=gen) / h ** 0.5).to(dtype)
    w2 = (torch.randn(e, h, inner, generator=gen) / inner ** 0.5).to(dtype)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=gen)
    return x, w13, w2, weights, ids


def per_token(x, w13, w2, weights, ids) -> torch.Tensor:
    """The definition, one token and one chosen expert at a time (float64)."""
    inner = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gu = w13[e].double() @ x[t].double()
            out[t] += weights[t, j].double() * (w2[e].double() @ (F.silu(gu[:inner]) * gu[inner:]))
    return out


def test_reference_matches_per_token_loop() -> None:
    case = make(t=9, k=3, e=6, h=16, inner=8, seed=1)
    torch.testing.assert_close(fused_moe_reference(*case).double(), per_token(*case), atol=1e-5, rtol=1e-5)


def test_align_pads_each_expert_run() -> None:
    pytest.importorskip("triton")
    from optimus.kernels._fused_moe_triton import align

    ids = torch.tensor([[2, 0], [2, 3], [0, 2]])
    pairs, blocks = align(ids, num_experts=5, block_m=4)
    # pairs sorted by expert: e0 -> pairs 1, 4; e2 -> pairs 0, 2, 5; e3 -> pair 3; sentinel 6 pads
    assert pairs[:12].tolist() == [1, 4, 6, 6, 0, 2, 5, 6, 3, 6, 6, 6]
    assert blocks.tolist()[:3] == [0, 2, 3] and set(blocks.tolist()[3:]) == {-1}
    assert pairs.numel() == 6 + 6 * 3  # T*k + (E + 1)*(block_m - 1) (id E: another rank's), rounded to a block


def test_align_gives_the_pairs_of_another_ranks_expert_no_block() -> None:
    pytest.importorskip("triton")
    from optimus.kernels._fused_moe_triton import align

    ids = torch.tensor([[2, 5], [5, 0]])  # 5 = E: the expert lives on another rank
    pairs, blocks = align(ids, num_experts=5, block_m=4)
    assert pairs[:8].tolist() == [3, 4, 4, 4, 0, 4, 4, 4]  # e0 -> pair 3, e2 -> pair 0; sentinel 4 pads
    assert blocks.tolist()[:2] == [0, 2] and set(blocks.tolist()[2:]) == {-1}


def _foreign(case, e: int, seed: int):
    """The case with about half its pairs' experts on another rank (id e), and the same case
    with those pairs' weights zeroed instead: both must give the same sum."""
    x, w13, w2, weights, ids = case
    away = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    away = away.to(ids.device)
    return (x, w13, w2, weights, ids.masked_fill(away, e)), (x, w13, w2, weights.masked_fill(away, 0.0), ids)


def test_reference_skips_the_pairs_of_another_ranks_experts() -> None:
    foreign, zeroed = _foreign(make(t=9, k=3, e=6, h=16, inner=8, seed=4), 6, seed=1)
    torch.testing.assert_close(fused_moe_reference(*foreign), fused_moe_reference(*zeroed))
    everything_away = foreign[:4] + (torch.full_like(foreign[4], 6),)
    assert fused_moe_reference(*everything_away).abs().max() == 0


@pytest.fixture
def moe_triton(triton_device):
    from optimus.kernels import _fused_moe_triton

    return _fused_moe_triton, triton_device


@pytest.mark.parametrize("t,k,e,h,inner", [(5, 2, 4, 32, 32), (19, 3, 5, 48, 40), (1, 2, 8, 32, 16)])
def test_triton_matches_reference(moe_triton, t, k, e, h, inner) -> None:
    mod, dev = moe_triton
    case = [c.to(dev) for c in make(t, k, e, h, inner, seed=t)]
    tiles = mod.MoeTiles(block_m=16, block_n=16, block_k=16, num_stages=1)
    got = mod.fused_moe_triton(*case, tiles=tiles)
    torch.testing.assert_close(got, fused_moe_reference(*case), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("t,k,e,h,inner", [(1, 2, 8, 40, 24), (3, 3, 5, 48, 40), (6, 2, 4, 16, 16)])
def test_pair_path_matches_reference(moe_triton, t, k, e, h, inner) -> None:
    """The decode (GEMV) path, with H and I off the tile sizes so every tail is masked."""
    mod, dev = moe_triton
    case = [c.to(dev) for c in make(t, k, e, h, inner, seed=10 + t)]
    tiles = mod.PairTiles(gate_up_n=16, down_n=16, block_k=16)
    got = mod.fused_moe_pairs(*case, tiles=tiles)
    torch.testing.assert_close(got, fused_moe_reference(*case), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("t", [3, 80, 600])  # the touched path, twice, and the grouped one
def test_triton_skips_the_pairs_of_another_ranks_experts(moe_triton, t) -> None:
    mod, dev = moe_triton
    foreign, zeroed = _foreign([c.to(dev) for c in make(t, 2, 4, 32, 24, seed=t)], 4, seed=t)
    torch.testing.assert_close(mod.fused_moe_triton(*foreign), fused_moe_reference(*zeroed), atol=2e-5, rtol=2e-5)


def test_routing_size_picks_the_path(moe_triton, monkeypatch) -> None:
    mod, dev = moe_triton
    taken = []
    for path in ("pairs", "touched", "grouped"):
        monkeypatch.setattr(mod, f"fused_moe_{path}",
                            lambda *a, path=path, **kw: taken.append(path) or fused_moe_reference(*a[:5]))
    for pairs in (2, mod.TOUCHED_MAX, mod.TOUCHED_MAX + 2):
        mod.fused_moe_triton(*[c.to(dev) for c in make(pairs // 2, 2, 4, 16, 16)])
    monkeypatch.setattr(mod, "PAIRS_MAX", 4)  # the pair path where a limit asks for it
    mod.fused_moe_triton(*[c.to(dev) for c in make(2, 2, 4, 16, 16)])
    assert taken == ["touched", "touched", "grouped", "pairs"]


def test_wrapper_routes_backends(moe_triton) -> None:
    _, dev = moe_triton
    case = [c.to(dev) for c in make(4, 2, 4, 16, 16, seed=3)]
    with torch.no_grad():
        torch.testing.assert_close(fused_moe(*case, backend="triton"), fused_moe(*case, backend="torch"),
                                   atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="shapes"):
        fused_moe(case[0][:, :8], *case[1:], backend="torch")


def test_triton_default_tiles_for_many_rows_per_expert(moe_triton) -> None:
    """Enough pairs per expert that the wrapper picks 64-row tiles (prefill-like)."""
    mod, dev = moe_triton
    case = [c.to(dev) for c in make(70, 2, 4, 16, 16, seed=7)]
    torch.testing.assert_close(mod.fused_moe_triton(*case), fused_moe_reference(*case), atol=2e-5, rtol=2e-5)


def test_mask_row_routing_keeps_k_distinct_experts_and_shares_them_within_a_request(monkeypatch) -> None:
    pytest.importorskip("triton")
    import optimus.bench.experiments.moe_check as moe_check

    monkeypatch.setattr(moe_check, "DEV", "cpu")
    ids = moe_check.local_ids(requests=4, rows=4, e=256, k=8, seed=0)
    assert ids.shape == (16, 8) and all(len(set(row.tolist())) == 8 for row in ids)
    per_request = [ids[4 * r:4 * r + 4].unique().numel() for r in range(4)]
    assert all(8 <= n <= 16 for n in per_request)  # mostly the request's own 8
    assert ids.unique().numel() > max(per_request)  # the requests differ from one another


@pytest.fixture
def moe_touched(triton_device):
    from optimus.kernels import _moe_touched_triton

    return _moe_touched_triton, triton_device


def test_touched_align_lists_each_expert_once(moe_touched) -> None:
    mod, dev = moe_touched
    ids = torch.tensor([[2, 0], [2, 3], [0, 2], [5, 3]], device=dev)  # 5 = E: another rank's expert
    p2 = 16
    buffers = [torch.full((n,), -7, dtype=torch.int32, device=dev) for n in (p2, p2, p2 + 1, p2, 1)]
    sorted_pairs, _, slot_start, slot_expert, num_slots = buffers
    mod._align_kernel[(1,)](ids.reshape(-1).contiguous(), *buffers, ids.numel(), 5, P2=p2)
    assert int(num_slots) == 3
    assert slot_expert[:3].tolist() == [0, 2, 3] and slot_start[:4].tolist() == [0, 2, 5, 7]
    assert sorted_pairs[:7].tolist() == [1, 4, 0, 2, 5, 3, 7]  # each expert's pairs in order


@pytest.mark.parametrize("t,k,e,h,inner", [(1, 2, 8, 40, 24), (5, 3, 5, 48, 40), (24, 2, 3, 32, 16)])
def test_touched_path_matches_reference(moe_touched, t, k, e, h, inner) -> None:
    """H and I off the tiles; at 24 x 2 pairs over 3 experts a run is longer than one 16-row chunk."""
    mod, dev = moe_touched
    case = [c.to(dev) for c in make(t, k, e, h, inner, seed=20 + t)]
    tiles = mod.TouchedTiles(block_m=16, gate_up_n=16, down_n=16, block_k=16, num_stages=1)
    got = mod.fused_moe_touched(*case, tiles=tiles)
    torch.testing.assert_close(got, fused_moe_reference(*case), atol=2e-5, rtol=2e-5)


def test_touched_path_skips_the_pairs_of_another_ranks_experts(moe_touched) -> None:
    mod, dev = moe_touched
    foreign, zeroed = _foreign([c.to(dev) for c in make(7, 2, 4, 32, 24, seed=5)], 4, seed=5)
    tiles = mod.TouchedTiles(block_m=16, gate_up_n=16, down_n=16, block_k=16, num_stages=1)
    torch.testing.assert_close(mod.fused_moe_touched(*foreign, tiles=tiles), fused_moe_reference(*zeroed),
                               atol=2e-5, rtol=2e-5)
    everything_away = foreign[:4] + (torch.full_like(foreign[4], 4),)
    assert mod.fused_moe_touched(*everything_away, tiles=tiles).abs().max() == 0
