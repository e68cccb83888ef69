"""The Triton router against models.moe.route: the same experts, in the same order, with the
same combine weights, for LLaDA2.0's grouped sigmoid routing and Qwen3-MoE's softmax routing."""

from __future__ import annotations

import pytest
import torch

from optimus.models.moe import route
from optimus.models.spec import MoEConfig

LLADA2 = MoEConfig(num_experts=64, top_k=8, expert_size=8, layers=(1,), scoring="sigmoid", n_group=8,
                   topk_group=4, scaling=2.5, expert_bias=True)
QWEN3 = MoEConfig(num_experts=32, top_k=4, expert_size=8, layers=(0,), scoring="softmax")


@pytest.fixture
def route_triton(triton_device):
    from optimus.kernels._moe_route_triton import route_triton

    def run(logits: torch.Tensor, cfg: MoEConfig, bias: torch.Tensor | None):
        dev = triton_device
        return route_triton(logits.to(dev), None if bias is None else bias.to(dev), top_k=cfg.top_k,
                            n_group=cfg.n_group, topk_group=cfg.topk_group, softmax=cfg.scoring == "softmax",
                            norm_topk=cfg.norm_topk, scaling=cfg.scaling)
    return run


@pytest.mark.parametrize("cfg", [LLADA2, QWEN3], ids=["grouped-sigmoid", "softmax"])
def test_triton_route_matches_reference(route_triton, cfg) -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, cfg.num_experts, generator=gen)
    bias = torch.randn(cfg.num_experts, generator=gen) * 0.1 if cfg.expert_bias else None
    weights, ids = route_triton(logits, cfg, bias)
    want_w, want_ids = route(logits, cfg, bias)
    assert ids.cpu().tolist() == want_ids.tolist()
    torch.testing.assert_close(weights.cpu(), want_w, atol=1e-6, rtol=1e-5)


def test_ties_go_to_the_lower_expert_and_group(route_triton) -> None:
    """Equal scores everywhere: the stable reference keeps groups 0-3 and experts 0-7."""
    logits = torch.zeros(2, LLADA2.num_experts)
    logits[1, 40] = 1.0  # one clear winner in group 5, the rest tied
    bias = torch.zeros(LLADA2.num_experts)
    weights, ids = route_triton(logits, LLADA2, bias)
    want_w, want_ids = route(logits, LLADA2, bias)
    assert ids.cpu().tolist() == want_ids.tolist()
    assert ids.cpu()[0].tolist() == list(range(8))
    torch.testing.assert_close(weights.cpu(), want_w, atol=1e-6, rtol=1e-5)


def test_router_takes_the_kernel_where_it_fits(triton_device) -> None:
    from optimus.models.moe import Router, route_kernel_fits

    assert route_kernel_fits(256, 8, 8) and route_kernel_fits(128, 1, 8)
    assert not route_kernel_fits(60, 1, 8) and not route_kernel_fits(64, 8, 6)
    router = Router(16, LLADA2).to(triton_device)
    torch.nn.init.normal_(router.weight)
    torch.nn.init.normal_(router.expert_bias, std=0.1)
    x = torch.randn(3, 16, device=triton_device)
    with torch.inference_mode():
        got_w, got_ids = router(x, "triton")
        want_w, want_ids = router(x, "torch")
    assert got_ids.tolist() == want_ids.tolist()
    torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=1e-5)
