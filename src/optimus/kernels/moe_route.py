"""MoE routing: router logits -> (combine weights, expert ids).

Backends: "torch" (reference.moe_route_reference: scores, bias, group limit, stable top-k,
gathered and normalised weights; a dozen small launches), "triton" (_moe_route_triton: all of it
in one launch where the expert tile fits, see ``kernel_fits``), "auto" (triton on CUDA when
Triton imports). Both choose the same experts in the same order: ties go to the lower index.

``live_rows`` ([1] int32 on the logits' device): rows from it on are a CUDA graph's padding,
owned by no request, whose hidden states are whatever the step's buffers held. They get id E
(no expert: fused_moe skips the pair) and weight 0, so they read no expert weights; routed as
tokens, each would read up to k experts of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from optimus.kernels.group_attention import resolve_backend
from optimus.kernels.reference import moe_route_reference


@dataclass(frozen=True)
class MoeRouting:
    top_k: int
    n_group: int = 1  # > 1: only the topk_group best groups of experts may be chosen
    topk_group: int = 1
    softmax: bool = True  # scores: softmax over experts (Qwen3-MoE), else sigmoid (LLaDA2.0)
    norm_topk: bool = True  # the chosen weights renormalised to sum to one
    scaling: float = 1.0


def kernel_fits(num_experts: int, routing: MoeRouting) -> bool:
    """Whether the Triton kernel's [groups, experts per group] tile holds this routing: powers of
    two (the published MoE models' 128 and 256 experts, 8 groups, top-8)."""
    groups = max(routing.n_group, 1)
    per_group = num_experts // groups
    return (num_experts % groups == 0 and num_experts <= 1024
            and all(n & (n - 1) == 0 for n in (groups, per_group, routing.top_k)))


def gate_and_route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, routing: MoeRouting,
                   backend: str = "auto", live_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], gate weight [E, H] -> moe_route of the fp32 logits ``linear(x.float(),
    weight.float())`` (LLaDA2.0's gate runs in fp32). "triton": two launches on the stored
    dtypes, the logits summed in fp32 (_moe_route_triton's doc: the same products, so the same
    logits up to summation order)."""
    if (resolve_backend(backend, x) == "triton" and not torch.is_grad_enabled() and x.dtype == weight.dtype
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and kernel_fits(weight.shape[0], routing)):
        from optimus.kernels._moe_route_triton import moe_route_triton, router_logits_triton

        return moe_route_triton(router_logits_triton(x, weight), bias, routing, live_rows)
    return moe_route(F.linear(x.float(), weight.float()), bias, routing, backend, live_rows)


def moe_route(logits: torch.Tensor, bias: torch.Tensor | None, routing: MoeRouting,
              backend: str = "auto", live_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E], bias [E] or None -> (weights [T, k] fp32, ids [T, k] int64 in [0, E]);
    ``live_rows`` as the module doc (None: every row is a token)."""
    if (resolve_backend(backend, logits) == "triton" and not torch.is_grad_enabled()
            and kernel_fits(logits.shape[1], routing)):
        from optimus.kernels._moe_route_triton import moe_route_triton

        return moe_route_triton(logits, bias, routing, live_rows)
    weights, ids = moe_route_reference(logits, bias, routing)
    if live_rows is None:
        return weights, ids
    padding = (torch.arange(ids.shape[0], device=ids.device) >= live_rows)[:, None]
    return weights.masked_fill(padding, 0.0), ids.masked_fill(padding, logits.shape[1])
