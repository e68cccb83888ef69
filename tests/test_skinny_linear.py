"""Weight-streaming linear for <= 16 rows: Triton vs F.linear, and when the kernel applies."""

from __future__ import annotations

import pytest
import torch

from optimus import toggles
import torch.nn.functional as F

from optimus.kernels import skinny_linear


@pytest.fixture(scope="module")
def kernel_env(triton_device):
    """(kernel module, device)."""
    from optimus.kernels import _skinny_linear_triton

    return _skinny_linear_triton, triton_device


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("m,n,k,block_n,block_k,bias", [
    (1, 48, 64, 16, 32, False),  # K a multiple of the tile: the unmasked loop
    (3, 40, 72, 16, 32, True),  # N and K ragged against their tiles, with bias
    (16, 20, 24, 32, 64, False),  # a full row tile; one K tile larger than K
    (7, 64, 256, 32, 128, True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_matches_linear(kernel_env, m, n, k, block_n, block_k, bias, dtype) -> None:
    mod, dev = kernel_env
    if dev == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter computes tl.dot on bf16 operands wrongly; bf16 is "
                    "checked on CUDA only")
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g).to(dev, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dev, dtype)
    b = torch.randn(n, generator=g).to(dev, dtype) if bias else None
    cfg = mod.SkinnyConfig(block_n=block_n, block_k=block_k, num_stages=2)
    got = mod.skinny_linear_triton(x, w, b, cfg)
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.shape == (m, n) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=TOL[dtype], rtol=TOL[dtype])


def test_row_strided_input(kernel_env) -> None:
    """A column slice of a wider activation (a merged projection's view) reads the right rows."""
    mod, dev = kernel_env
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(4, 96, generator=g).to(dev)
    w = torch.randn(32, 64, generator=g).to(dev)
    x = wide[:, 16:80]
    got = skinny_linear.linear(x, w, backend="triton")
    torch.testing.assert_close(got, F.linear(x, w), atol=1e-5, rtol=1e-5)


def test_zero_rows(kernel_env) -> None:
    mod, dev = kernel_env
    w = torch.randn(8, 16).to(dev)
    assert mod.skinny_linear_triton(torch.zeros(0, 16, device=dev), w, None).shape == (0, 8)


@pytest.mark.parametrize("case", ["too_many_rows", "grad", "float64", "transposed_weight"])
def test_falls_back_to_torch_outside_its_contract(case, monkeypatch) -> None:
    """Inputs the kernel does not cover run F.linear (bit-identical), even with backend="triton"."""
    def boom(*args, **kwargs):
        raise AssertionError("the kernel must not run here")

    from optimus.kernels import _skinny_linear_triton

    monkeypatch.setattr(_skinny_linear_triton, "skinny_linear_triton", boom)
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    if case == "too_many_rows":
        x = torch.randn(toggles.active().skinny_max_rows + 1, 8)
    elif case == "grad":
        w.requires_grad_(True)
    elif case == "float64":
        x, w = x.double(), w.double()
    else:
        w = torch.randn(8, 6).t()
    with torch.set_grad_enabled(case == "grad"):
        got = skinny_linear.linear(x, w, backend="triton")
        assert torch.equal(got, F.linear(x, w))


def test_torch_backend_is_f_linear() -> None:
    x, w, b = torch.randn(2, 8), torch.randn(5, 8), torch.randn(5)
    assert torch.equal(skinny_linear.linear(x, w, b, backend="torch"), F.linear(x, w, b))


def test_pdl_launch_options_go_together() -> None:
    """The PDL prologue and the launch attribute are on or off together; never off CUDA."""
    from optimus.kernels import pdl

    assert pdl.launch_options(torch.device("cpu")) == {"PDL": False}
    if torch.cuda.is_available():
        opts = pdl.launch_options(torch.device("cuda"))
        assert opts["PDL"] == opts.get("launch_pdl", False) == pdl.launch_pdl(torch.device("cuda"))
