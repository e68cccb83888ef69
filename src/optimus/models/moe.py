"""The sparse MLP shared by the MoE families: router, stacked expert weights, shared expert.

Expert weights live stacked, ``w13`` [E, 2I, H] (gate rows then up rows) and ``w2`` [E, H, I],
the layout the fused kernel reads; their state_dict still uses the checkpoints' per-expert
names (``experts.{i}.gate_proj.weight`` ...), so loading and exporting see the HF layout.
The expert computation is kernels.fused_moe: the torch reference (tokens grouped by expert,
one matmul pair per touched expert) by default, the Triton kernel for CUDA inference.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from optimus import toggles
from optimus.kernels.fused_moe import fused_moe
from optimus.kernels.group_attention import resolve_backend
from optimus.models.layers import no_reduce
from optimus.models.spec import MoEConfig

_PROJ = ("gate_proj", "up_proj", "down_proj")


def route_kernel_fits(num_experts: int, n_group: int, top_k: int) -> bool:
    """Whether the Triton router's tile holds this routing: power-of-two group and expert
    counts (the published MoE models' 128 and 256 experts, 8 groups, top-8)."""
    groups = max(n_group, 1)
    per_group = num_experts // groups
    return (num_experts % groups == 0 and num_experts <= 1024
            and all(n & (n - 1) == 0 for n in (groups, per_group, top_k)))


def top_k_stable(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries per row; ties go to the lower index (a stable sort),
    so a routing decision never depends on the device's topk implementation."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def group_limit(choice: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """Keep the experts of the ``topk_group`` best groups (a group scores the sum of its two
    best entries, LLaDA2.0's rule), the rest become -inf. choice [T, E] fp32."""
    t, e = choice.shape
    grouped = choice.view(t, n_group, e // n_group)
    group_scores = grouped.topk(min(2, e // n_group), dim=-1).values.sum(-1)
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, top_k_stable(group_scores, topk_group), True)
    return grouped.masked_fill(~keep[:, :, None], float("-inf")).view(t, e)


def route(logits: torch.Tensor, cfg: MoEConfig, bias: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (combine weights [T, k] fp32, expert ids [T, k] int64).

    The bias (sigmoid routing) only shifts which experts are chosen; the weights are the
    unbiased scores of the chosen experts."""
    logits = logits.float()
    scores = logits.softmax(-1) if cfg.scoring == "softmax" else logits.sigmoid()
    choice = scores if bias is None else scores + bias.float()
    if cfg.n_group > 1:
        choice = group_limit(choice, cfg.n_group, cfg.topk_group)
    ids = top_k_stable(choice, cfg.top_k)
    weights = scores.gather(1, ids)
    if cfg.norm_topk and cfg.top_k > 1:
        eps = 1e-20 if cfg.scoring == "sigmoid" else 0.0
        weights = weights / (weights.sum(-1, keepdim=True) + eps)
    return weights * cfg.scaling, ids


class Router(nn.Module):
    """``gate.weight`` [E, H] and, for sigmoid routing, ``gate.expert_bias`` [E]."""

    def __init__(self, hidden: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden))
        # A parameter (not a buffer) so random-weight models initialise it; it is never trained.
        self.expert_bias = nn.Parameter(torch.zeros(cfg.num_experts), requires_grad=False) if cfg.expert_bias else None

    def forward(self, x: torch.Tensor, backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
        """``backend`` as fused_moe's: "triton" routes in one kernel (_moe_route_triton) where
        its tile fits the expert count, for inference; the result is the same as ``route``'s."""
        if self.cfg.scoring == "softmax":  # Qwen3-MoE: logits in the activation dtype
            logits = F.linear(x, self.weight)
        else:  # LLaDA2.0: the gate runs in fp32
            logits = F.linear(x.float(), self.weight.float())
        cfg = self.cfg
        if (resolve_backend(backend, x) == "triton" and not torch.is_grad_enabled()
                and route_kernel_fits(cfg.num_experts, cfg.n_group, cfg.top_k)):
            from optimus.kernels._moe_route_triton import route_triton

            return route_triton(logits, self.expert_bias, top_k=cfg.top_k, n_group=cfg.n_group,
                                topk_group=cfg.topk_group, softmax=cfg.scoring == "softmax",
                                norm_topk=cfg.norm_topk, scaling=cfg.scaling)
        return route(logits, cfg, self.expert_bias)


class ExpertWeights(nn.Module):
    """Stacked expert weights exposed under per-expert checkpoint names."""

    def __init__(self, num_experts: int, hidden: int, inner: int) -> None:
        super().__init__()
        self.num_experts, self.inner = num_experts, inner
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inner, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inner))

    def _views(self, i: int) -> dict[str, torch.Tensor]:
        return {"gate_proj": self.w13[i, :self.inner], "up_proj": self.w13[i, self.inner:], "down_proj": self.w2[i]}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for i in range(self.num_experts):
            for proj, view in self._views(i).items():
                destination[f"{prefix}{i}.{proj}.weight"] = view if keep_vars else view.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        names = {(i, p): f"{prefix}{i}.{p}.weight" for i in range(self.num_experts) for p in _PROJ}
        absent = [n for n in names.values() if n not in state_dict]
        if absent:
            missing_keys.extend(absent)
            return
        get = lambda i, p: state_dict[names[(i, p)]]  # noqa: E731
        w13 = torch.stack([torch.cat([get(i, "gate_proj"), get(i, "up_proj")]) for i in range(self.num_experts)])
        w2 = torch.stack([get(i, "down_proj") for i in range(self.num_experts)])
        with torch.no_grad():
            if local_metadata.get("assign_to_params_buffers", False) or self.w13.is_meta:
                self.w13 = nn.Parameter(w13, requires_grad=self.w13.requires_grad)
                self.w2 = nn.Parameter(w2, requires_grad=self.w2.requires_grad)
            else:
                self.w13.copy_(w13)
                self.w2.copy_(w2)


class SparseMoE(nn.Module):
    """``gate`` (router), ``experts`` and optionally ``shared_experts`` (one gated MLP that
    every token runs, added to the routed sum)."""

    def __init__(self, hidden: int, cfg: MoEConfig, shared: nn.Module | None = None) -> None:
        super().__init__()
        self.gate = Router(hidden, cfg)
        self.experts = ExpertWeights(cfg.num_experts, hidden, cfg.expert_size)
        self.shared_experts = shared
        self.reduce = no_reduce  # once for routed + shared (a shard's shared expert does not reduce)

    def forward(self, x: torch.Tensor, ops=None) -> torch.Tensor:
        """x [T, H] -> [T, H]. ``ops`` (LayerOps) runs the shared expert's linears."""
        backend = self.backend(x)
        weights, ids = self.gate(x, backend)
        out = fused_moe(x, self.experts.w13, self.experts.w2, weights, ids, backend)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x, ops)
        return self.reduce(out)

    @staticmethod
    def backend(x: torch.Tensor) -> str:
        """As the layer ops (toggles.model_kernels): "auto" is the Triton kernel for CUDA
        inference (graph-safe) and the torch reference elsewhere; "torch" / "triton" force one."""
        return toggles.active().model_kernels

    def fuse_projections(self) -> None:
        if self.shared_experts is not None:
            self.shared_experts.fuse_projections()
