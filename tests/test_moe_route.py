"""The Triton router (kernels/_moe_route_triton) against its torch reference: the same experts,
in the same order, with the same combine weights, for LLaDA2.0's grouped sigmoid routing and
Qwen3-MoE's softmax routing; and where the wrapper and the model's Router take it."""

from __future__ import annotations

import pytest
import torch

from optimus.kernels.moe_route import MoeRouting, kernel_fits
from optimus.kernels.reference import moe_route_reference
from optimus.models.spec import MoEConfig

LLADA2 = MoeRouting(top_k=8, n_group=8, topk_group=4, softmax=False, scaling=2.5)  # at 64 experts
QWEN3 = MoeRouting(top_k=4)  # at 32 experts


@pytest.fixture
def route_triton(triton_device):
    from optimus.kernels._moe_route_triton import moe_route_triton

    def run(logits: torch.Tensor, routing: MoeRouting, bias: torch.Tensor | None):
        return moe_route_triton(logits.to(triton_device), None if bias is None else bias.to(triton_device), routing)
    return run


@pytest.mark.parametrize("routing,experts,biased", [(LLADA2, 64, True), (QWEN3, 32, False)],
                         ids=["grouped-sigmoid", "softmax"])
def test_triton_route_matches_reference(route_triton, routing, experts, biased) -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, experts, generator=gen)
    bias = torch.randn(experts, generator=gen) * 0.1 if biased else None
    weights, ids = route_triton(logits, routing, bias)
    want_w, want_ids = moe_route_reference(logits, bias, routing)
    assert ids.cpu().tolist() == want_ids.tolist()
    torch.testing.assert_close(weights.cpu(), want_w, atol=1e-6, rtol=1e-5)


def test_ties_go_to_the_lower_expert_and_group(route_triton) -> None:
    """Equal scores everywhere: the stable reference keeps groups 0-3 and experts 0-7."""
    logits = torch.zeros(2, 64)
    logits[1, 40] = 1.0  # one clear winner in group 5, the rest tied
    bias = torch.zeros(64)
    weights, ids = route_triton(logits, LLADA2, bias)
    want_w, want_ids = moe_route_reference(logits, bias, LLADA2)
    assert ids.cpu().tolist() == want_ids.tolist()
    assert ids.cpu()[0].tolist() == list(range(8))
    torch.testing.assert_close(weights.cpu(), want_w, atol=1e-6, rtol=1e-5)


def test_kernel_fits_powers_of_two_only() -> None:
    assert kernel_fits(256, MoeRouting(top_k=8, n_group=8, topk_group=4)) and kernel_fits(128, MoeRouting(top_k=8))
    assert not kernel_fits(60, MoeRouting(top_k=8)) and not kernel_fits(64, MoeRouting(top_k=6))


def test_router_takes_the_kernel_in_inference(triton_device, monkeypatch) -> None:
    from optimus.kernels import _moe_route_triton
    from optimus.models.moe import Router

    cfg = MoEConfig(num_experts=64, top_k=8, expert_size=8, layers=(1,), scoring="sigmoid", n_group=8,
                    topk_group=4, scaling=2.5, expert_bias=True)
    router = Router(16, cfg).to(triton_device)
    torch.nn.init.normal_(router.weight)
    torch.nn.init.normal_(router.expert_bias, std=0.1)
    x = torch.randn(3, 16, device=triton_device)
    calls = []
    for name in ("moe_route_triton", "router_logits_triton"):
        kernel = getattr(_moe_route_triton, name)
        monkeypatch.setattr(_moe_route_triton, name, lambda *a, k=kernel, n=name: calls.append(n) or k(*a))
    with torch.inference_mode():
        got_w, got_ids = router(x, "triton")
        want_w, want_ids = router(x, "torch")
    router(x, "triton")  # gradients on: the reference (the kernel has no backward)
    assert calls == ["router_logits_triton", "moe_route_triton"]
    assert got_ids.tolist() == want_ids.tolist()
    torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padding_rows_route_to_no_expert(backend, request) -> None:
    """Rows from ``live_rows`` on (a CUDA graph's padding: garbage hidden states) get id E and
    weight 0, so fused_moe reads no expert for them; the live rows route as without it."""
    from optimus.kernels.moe_route import moe_route

    device = request.getfixturevalue("triton_device") if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(6, 64, generator=gen).to(device)
    logits[4:] = float("nan")  # what an unwritten buffer may hold
    bias = (torch.randn(64, generator=gen) * 0.1).to(device)
    live = torch.tensor([4], dtype=torch.int32, device=device)
    with torch.inference_mode():
        weights, ids = moe_route(logits, bias, LLADA2, backend, live_rows=live)
    want_w, want_ids = moe_route_reference(logits[:4].cpu(), bias.cpu(), LLADA2)
    assert ids.cpu()[:4].tolist() == want_ids.tolist()
    torch.testing.assert_close(weights.cpu()[:4], want_w, atol=1e-6, rtol=1e-5)
    assert (ids.cpu()[4:] == 64).all() and (weights.cpu()[4:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,programs", [(1, 128), (20, 128), (20, 1)])  # inputs split in 2 parts, or whole
def test_router_logits_are_the_fp32_gates(triton_device, dtype, rows, programs) -> None:
    """The logits kernel multiplies the stored values and sums in fp32: LLaDA2.0's
    ``linear(x.float(), weight.float())`` up to summation order, at sizes that mask every tile
    and split edge (40 experts, 300 inputs: neither a multiple of its blocks)."""
    from optimus.kernels._moe_route_triton import router_logits_triton

    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 300, generator=gen).to(dtype)
    weight = (torch.randn(40, 300, generator=gen) * 0.05).to(dtype)
    want = torch.nn.functional.linear(x.double(), weight.double())
    with torch.inference_mode():
        parts = router_logits_triton(x.to(triton_device), weight.to(triton_device), programs=programs)
    assert parts.dtype == torch.float32 and parts.shape == (2 if programs > 1 else 1, rows, 40)
    torch.testing.assert_close(parts.cpu().double().sum(0), want, atol=1e-5, rtol=1e-5)


def test_gate_and_route_in_two_launches_matches_the_reference(triton_device) -> None:
    """Partial logits summed inside the routing kernel choose what the fp32 gate chooses."""
    from optimus.kernels.moe_route import gate_and_route

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(5, 300, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(64, 300, generator=gen) * 0.05).to(torch.bfloat16)
    bias = torch.randn(64, generator=gen) * 0.1
    with torch.inference_mode():
        got_w, got_ids = gate_and_route(x.to(triton_device), weight.to(triton_device), bias.to(triton_device),
                                        LLADA2, "triton")
        want_w, want_ids = gate_and_route(x, weight, bias, LLADA2, "torch")
    assert got_ids.cpu().tolist() == want_ids.tolist()
    torch.testing.assert_close(got_w.cpu(), want_w, atol=1e-5, rtol=1e-5)
