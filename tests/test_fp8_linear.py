"""FP8-weight linears: the Triton kernel against the dequantizing reference, and models whose
projections stay in FP8 (memory, merged projections, the same logits as FP8-rounded weights)."""

from __future__ import annotations

import pytest
import torch

from optimus.kernels.fp8_linear import Fp8Weight, fp8_linear, fp8_linear_reference
from optimus.models.fp8 import E4M3_MAX, Fp8Linear, dequantize, quantize_rows
from optimus.models.loader import load_model
from fixtures.checkpoints import make_tiny_checkpoint


def _weight(n: int, k: int, g: torch.Generator, device: str = "cpu") -> Fp8Weight:
    q, scale = quantize_rows(torch.randn(n, k, generator=g) * torch.logspace(-2, 0, n)[:, None])
    return Fp8Weight(q.to(device), scale.reshape(-1).to(device))


@pytest.mark.parametrize("m,n,k,bias", [
    (1, 48, 64, False),  # one row, K a multiple of the tile
    (5, 40, 96, True),  # N and K ragged against the tiles
    (16, 64, 256, False),  # the last weight-streaming row count
    (17, 64, 100, True),  # the tiled path, K ragged
    (70, 130, 64, False),  # several row tiles and column tiles
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_matches_the_fp32_product(triton_device, m, n, k, bias, dtype):
    if triton_device == "cpu" and dtype != torch.float32:
        pytest.skip("Triton's interpreter computes tl.dot on 16-bit operands wrongly; checked on CUDA only")
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    w = _weight(n, k, g, triton_device)
    x = torch.randn(m, k, generator=g).to(triton_device, dtype)
    b = torch.randn(n, generator=g).to(triton_device, dtype) if bias else None
    y = fp8_linear(x, w, b, backend="triton")
    exact = x.double() @ (w.data.double() * w.scale.double()[:, None]).T + (0 if b is None else b.double())
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert y.dtype == dtype and y.shape == (m, n)
    assert torch.allclose(y.double(), exact, rtol=tol, atol=tol * exact.abs().max().item())


def _block_weight(n: int, k: int, block: tuple[int, int], g: torch.Generator, device: str = "cpu") -> Fp8Weight:
    """Scaled per (bn, bk) tile as fine-grained FP8 checkpoints are; N and K may be ragged."""
    bn, bk = block
    w = torch.randn(n, k, generator=g) * torch.logspace(-2, 0, n)[:, None]
    tiles = torch.nn.functional.pad(w, (0, -k % bk, 0, -n % bn)).unfold(0, bn, bn).unfold(1, bk, bk)
    scale = (tiles.abs().amax(dim=(-1, -2)) / E4M3_MAX).clamp(min=1e-12)
    full = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return Fp8Weight((w / full).to(torch.float8_e4m3fn).to(device), scale.contiguous().to(device), block)


@pytest.mark.parametrize("m,n,k,block", [(1, 48, 64, (16, 32)), (6, 40, 100, (16, 32)), (33, 64, 128, (32, 64))])
def test_block_scales_match_the_fp32_product(triton_device, m, n, k, block):
    g = torch.Generator().manual_seed(m + n + k)
    w = _block_weight(n, k, block, g, triton_device)
    x = torch.randn(m, k, generator=g).to(triton_device)
    exact = x.double() @ (w.data.double() * w.expanded_scale().double()).T
    y = fp8_linear(x, w, backend="triton")
    assert torch.allclose(y.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
    assert torch.allclose(fp8_linear_reference(x.cpu(), Fp8Weight(*(t.cpu() for t in w[:2]), block)).double(),
                          exact.cpu(), rtol=1e-5, atol=1e-5 * exact.abs().max().item())


def test_reference_is_the_dequantized_linear():
    g = torch.Generator().manual_seed(0)
    w = _weight(24, 40, g)
    x = torch.randn(3, 40, generator=g)
    assert torch.equal(fp8_linear_reference(x, w), x @ dequantize(w.data, w.scale[:, None]).T)
    assert torch.equal(fp8_linear(x, w, backend="auto"), fp8_linear_reference(x, w))  # CPU: the reference


def test_bad_fp8_weights_are_refused():
    g = torch.Generator().manual_seed(0)
    w = _weight(8, 16, g)
    with pytest.raises(ValueError, match="e4m3"):
        fp8_linear(torch.randn(2, 16), Fp8Weight(w.data.float(), w.scale))
    with pytest.raises(ValueError, match="one per output channel"):
        fp8_linear(torch.randn(2, 16), Fp8Weight(w.data, w.scale[:, None]))
    with pytest.raises(ValueError, match="shapes"):
        fp8_linear(torch.randn(2, 15), w)


def _rounded_in_place(model) -> None:
    """The old way: projections rounded to FP8 values but kept in the load dtype."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.weight"):
                p.copy_(dequantize(*quantize_rows(p)))


@pytest.mark.parametrize("family", ["llama", "sdar"])
def test_fp8_projections_stay_fp8_and_compute_the_rounded_weights(tmp_path, family):
    root = make_tiny_checkpoint(tmp_path / family, family)
    fp8 = load_model(root, dtype="float32", device="cpu", progress=False, quantization="fp8").model
    rounded = load_model(root, dtype="float32", device="cpu", progress=False).model
    _rounded_in_place(rounded)
    projections = [m for m in fp8.modules() if isinstance(m, Fp8Linear)]
    assert len(projections) == 7 * len(fp8.model.layers)
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in projections)
    fp8_bytes = sum(m.weight.numel() * m.weight.element_size() for m in projections)
    assert fp8_bytes == sum(m.weight.numel() for m in projections)  # one byte per weight
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    for model in (fp8, rounded):
        model.fuse_projections()  # q/k/v and gate/up merged, FP8 scales included
    assert all(m.self_attn.merged_scale is not None for m in fp8.model.layers)
    with torch.inference_mode():
        assert torch.equal(_logits(fp8, ids), _logits(rounded, ids))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    from optimus.models.dense import dense_forward

    return dense_forward(model, ids)[0]


def test_an_fp8_linear_module_is_its_rounded_linear():
    lin = torch.nn.Linear(32, 12, bias=True)
    q = Fp8Linear.from_linear(lin)
    x = torch.randn(4, 32)
    w = dequantize(*quantize_rows(lin.weight.detach()))
    assert torch.equal(q(x), torch.nn.functional.linear(x, w, lin.bias))
    assert q.operand.data.dtype == torch.float8_e4m3fn and q.operand.scale.shape == (12,)


def test_an_fp8_model_keeps_its_own_latency_profile(tmp_path):
    """Its steps cost differently from the same model's in the load dtype: a shared cached
    profile would be re-measured by each in turn."""
    from types import SimpleNamespace

    from optimus.policy.elastic.setup import model_id

    root = make_tiny_checkpoint(tmp_path / "m", "sdar")
    ids = []
    for quantization in (None, "fp8"):
        loaded = load_model(root, dtype="float32", device="cpu", progress=False, quantization=quantization)
        ids.append(model_id(SimpleNamespace(loaded=loaded, spec=loaded.spec)))
    assert ids[1] == ids[0] + "-fp8"
