"""Greedy pick (argmax token + its softmax probability): Triton vs the torch reference."""

from __future__ import annotations

import pytest
import torch

from optimus.kernels.greedy import argmax_prob, argmax_prob_reference


@pytest.fixture(scope="module")
def kernel_env(triton_device):
    """(kernel module, device)."""
    from optimus.kernels import _greedy_triton

    return _greedy_triton, triton_device


@pytest.mark.parametrize("rows,vocab,splits", [(1, 3000, None), (3, 5000, 4), (2, 777, 8), (5, 64, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_softmax_then_max(kernel_env, rows, vocab, splits, dtype) -> None:
    """Rows over several splits (some empty: 8 splits of 777), ragged against the block."""
    mod, dev = kernel_env
    g = torch.Generator().manual_seed(rows * vocab)
    logits = (4 * torch.randn(rows, vocab, generator=g)).to(dev, dtype)
    tokens, probs = mod.argmax_prob_triton(logits, splits)
    want_tokens, want_probs = argmax_prob_reference(logits)
    assert tokens.dtype == torch.int64 and probs.dtype == torch.float32
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(probs, want_probs, rtol=1e-5, atol=1e-7)


def test_ties_take_the_first_index_across_splits(kernel_env) -> None:
    """The maximum appears in two splits and twice within one: the first column wins, as in torch."""
    mod, dev = kernel_env
    logits = torch.zeros(2, 4096)
    logits[0, [3000, 1500, 1501]] = 7.0  # splits of 1024: 1500/1501 in split 1, 3000 in split 2
    logits[1, [4095, 2048]] = 2.0
    tokens, probs = mod.argmax_prob_triton(logits.to(dev), 4)
    assert tokens.tolist() == [1500, 2048]
    assert tokens.tolist() == argmax_prob_reference(logits)[0].tolist()
    torch.testing.assert_close(probs.cpu(), argmax_prob_reference(logits)[1], rtol=1e-5, atol=1e-7)


def test_wrapper_checks_shape_and_keeps_torch_on_request() -> None:
    logits = torch.randn(2, 10)
    tokens, probs = argmax_prob(logits, backend="torch")
    assert torch.equal(tokens, logits.argmax(-1))
    with pytest.raises(ValueError):
        argmax_prob(torch.randn(10))
