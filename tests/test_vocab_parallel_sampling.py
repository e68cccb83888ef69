"""The vocabulary-parallel draw (parallel/sampling.py) is ``rules.propose`` on the gathered rows:
the same tokens and the same confidence, with the vocabulary split over 2-3 simulated ranks
(threads of one process, their all_gather a barrier), for greedy and sampled rows, top-k, top-p,
ties at either boundary, min_tokens suppression and rows the candidates cannot decide."""

from __future__ import annotations

import threading

import pytest
import torch

from optimus.decoding.rules import RowDraws, _filter, gumbel_noise, gumbel_slice, propose
from optimus.executor.sampled_rows import SampledRows
from optimus.parallel.sampling import NUCLEUS_CANDIDATES, VocabSlice, draw
from optimus.parallel.sharding import vocab_bounds


class _Ranks:
    """``size`` ranks in threads of this process; ``gather(rank)`` is their all_gather."""

    def __init__(self, size: int) -> None:
        self.size, self.slots, self.barrier = size, [None] * size, threading.Barrier(size, timeout=60)
        self.widths: list[int] = []  # last dim of every tensor rank 0 gathered

    def gather(self, rank: int):
        def all_gather(x: torch.Tensor) -> list[torch.Tensor]:
            if rank == 0:
                self.widths.append(x.shape[-1])
            self.slots[rank] = x.clone()
            self.barrier.wait()
            parts = list(self.slots)
            self.barrier.wait()  # nobody writes the next call's slot before every rank read this one
            return parts
        return all_gather


def _parallel(logits: torch.Tensor, draws: RowDraws, size: int, suppress=None, **limits):
    """Every rank's (tokens, confidence, rows gathered whole), and the widths rank 0 gathered."""
    vocab, ranks = logits.shape[1], _Ranks(size)
    out: list = [None] * size

    def run(rank: int) -> None:
        lo, hi = vocab_bounds(vocab, rank, size)
        out[rank] = draw(logits[:, lo:hi], draws, VocabSlice(lo, hi, vocab, size), ranks.gather(rank), suppress,
                         **limits)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(o is not None for o in out), "a simulated rank raised"
    return out, ranks.widths


def _draws(n: int, temperature, top_k, top_p, seed: int = 1) -> RowDraws:
    def col(v, dtype):
        return (v if isinstance(v, torch.Tensor) else torch.full((n,), v)).to(dtype)
    return RowDraws(col(temperature, torch.float32), col(top_k, torch.int64), col(top_p, torch.float32),
                    torch.full((n,), seed, dtype=torch.int64), torch.arange(n, dtype=torch.int64) * 7 + 3,
                    torch.arange(n, dtype=torch.int64) % 3)


def _check(logits: torch.Tensor, draws: RowDraws, size: int, suppress=None, **limits) -> list[int]:
    """The parallel draw on every rank equals propose on the full (suppressed) rows -> rows gathered whole."""
    full = logits.clone()
    if suppress is not None:
        full[suppress[0], suppress[1]] = float("-inf")
    want_tokens, want_conf = propose(full, draws)
    out, _ = _parallel(logits, draws, size, suppress, **limits)
    for tokens, conf, _ in out:
        assert torch.equal(tokens, want_tokens)
        torch.testing.assert_close(conf, want_conf, rtol=1e-6, atol=1e-12)
    return [whole for _, _, whole in out]


def _mixed(vocab: int, rows: int = 60, seed: int = 0) -> tuple[torch.Tensor, RowDraws]:
    """Random logits with ties across slices, and rows of every kind: greedy, plain sampled,
    top-k (1, small, past the vocabulary), top-p, both, at several temperatures."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 3
    logits[::4, vocab - 2] = logits[::4, 1] = logits[::4].max(-1).values + 0.5  # the best value twice
    logits[1::4, :vocab:5] = 2.5  # a plateau across every slice (ties at the top-k / top-p boundary)
    temperature = torch.tensor([0.0, 0.6, 1.0, 1.7])[torch.arange(rows) % 4]
    top_k = torch.tensor([0, 0, 1, 3, 7, vocab + 5, 0, 12])[torch.arange(rows) % 8]
    top_p = torch.tensor([1.0, 0.9, 0.3, 1.0, 0.6])[torch.arange(rows) % 5]
    return logits, _draws(rows, temperature, top_k, top_p, seed=seed + 11)


@pytest.mark.parametrize("size,vocab", [(2, 101), (3, 101), (3, 37), (2, 384)])
def test_mixed_rows_draw_the_tokens_of_propose(size, vocab):
    for seed in range(3):
        logits, draws = _mixed(vocab, seed=seed)
        assert _check(logits, draws, size) == [0] * size  # every top-p row decided on its candidates


@pytest.mark.parametrize("size", [2, 3])
def test_min_tokens_suppression_is_written_by_the_rank_holding_the_id(size):
    logits, draws = _mixed(101, seed=5)
    rows = torch.tensor([0, 1, 2, 3, 9, 9, 30, 30, 30])
    ids = torch.tensor([1, 99, 50, 0, 1, 99, 34, 35, 67])  # ids in every slice, the rows' best among them
    logits[rows, ids] = logits.max() + 1.0  # without the suppression these would win
    _check(logits, draws, size, (rows, ids))


def test_a_batch_of_greedy_rows_with_suppression_is_the_argmax():
    logits = torch.randn(16, 101) * 2
    rows, ids = torch.arange(16), torch.full((16,), 77)
    logits[:, 77] = 50.0
    _check(logits, _draws(16, 0.0, 0, 1.0), 2, (rows, ids))


@pytest.mark.parametrize("size", [2, 3])
def test_equal_logits_at_the_top_p_boundary_keep_the_lower_ids(size):
    """Four equal logits, the rest -1e4 (probability exactly 0): p = 1/4 each, exactly. top-p 0.5
    keeps three (exclusive sums 0, 1/4, 1/2 are not above 0.5): the three lowest ids."""
    vocab, n = 101, 64
    logits = torch.full((n, vocab), -1e4)
    tied = [5, 40, 70, 99]  # across every slice
    logits[:, tied] = 1.0
    draws = _draws(n, 1.0, 0, 0.5)
    _check(logits, draws, size)
    drawn = set(propose(logits, draws)[0].tolist())
    assert drawn == {5, 40, 70}  # 99 is never drawn; the others are


@pytest.mark.parametrize("size", [2, 3])
def test_equal_logits_at_the_top_k_boundary_keep_the_lower_ids(size):
    vocab, n = 101, 64
    logits = torch.zeros(n, vocab)
    logits[:, 60] = 3.0
    logits[:, [10, 50, 80, 95]] = 2.0  # top-2: id 60 and the lowest of these
    draws = _draws(n, 5.0, 2, 1.0)
    _check(logits, draws, size)
    assert set(propose(logits, draws)[0].tolist()) == {10, 60}


def test_the_filter_ranks_equal_logits_by_id():
    row = torch.tensor([[1.0, 3, 3, 2, 3, 3, 3, 1, 3] * 100])
    kept = torch.isfinite(_filter(row, _draws(1, 1.0, 5, 1.0))[0])
    threes = torch.nonzero(row[0] == 3).flatten()
    assert torch.nonzero(kept).flatten().tolist() == threes[:5].tolist()


def test_top_p_rows_past_their_candidates_gather_their_full_rows():
    """Flat rows: top-p 0.9 needs most of the vocabulary, more than 4 candidates hold; top-k past
    the limit too. Those rows (only those) are drawn from their gathered rows, as propose does."""
    vocab, n = 101, 12
    logits = torch.randn(n, vocab) * 0.1
    logits[::2, 7] = 30.0  # peaked rows: 4 candidates hold all their probability
    top_k = torch.tensor([0, 0, 0, 0, 50, 50] * 2)
    draws = _draws(n, 1.0, top_k, 0.9)
    whole = _check(logits, draws, 2, nucleus=4, max_k=16)
    # rows 4, 5, 10, 11 (top-k 50 > 16) and the flat top-p rows 1, 3, 7, 9; the peaked 0, 2, 6, 8 are decided
    assert whole == [8, 8]
    out, widths = _parallel(logits, draws, 2, nucleus=4, max_k=16)
    assert widths[-1] == 51  # the last gather is the full rows of the slice (101 / 2, padded)


def test_the_draw_gathers_no_logit_row():
    """Sampled rows with top-k, top-p, both, and greedy ones: a few values per row cross, never a slice."""
    logits, draws = _mixed(8001, rows=24)
    out, widths = _parallel(logits, draws, 2)
    assert widths == [2 + 2 * NUCLEUS_CANDIDATES, 5] and out[0][2] == 0  # (max, sum exp, candidates); winners


def test_gumbel_slice_is_the_full_rows_noise_there():
    draws = _draws(9, 1.0, 0, 1.0, seed=123)
    full = gumbel_noise(draws, 1003)
    for lo, hi in [(0, 502), (502, 1003), (17, 400), (1000, 1003)]:
        assert torch.equal(gumbel_slice(draws, lo, hi), full[:, lo:hi])


def test_sampled_rows_record_the_postprocessors_writes():
    """What postprocess does to gathered logits: row ranges, an in-place -inf write at
    (rows[:, None], ids), a row subset; the subset's suppressed pairs are those of its rows."""
    rows = SampledRows(None, torch.zeros(6, 4))
    part = rows[2:5]
    part[torch.tensor([0, 2])[:, None], torch.tensor([7, 9])] = float("-inf")  # hidden rows 2 and 4
    rows[0:2][torch.tensor([1])[:, None], torch.tensor([3])] = float("-inf")  # hidden row 1
    sub = rows[torch.tensor([1, 2, 3, 4])]
    r, i = sub.suppression()
    assert sorted(zip(r.tolist(), i.tolist())) == [(0, 3), (1, 7), (1, 9), (3, 7), (3, 9)]
    assert len(sub) == 4 and sub[1:3].suppression()[0].tolist() == [0, 0]
    with pytest.raises(TypeError):
        part[torch.tensor([0])[:, None], torch.tensor([1])] = 0.0
