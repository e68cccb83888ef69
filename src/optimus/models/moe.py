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
from optimus.kernels.moe_route import MoeRouting, gate_and_route, moe_route
from optimus.models.layers import no_reduce
from optimus.models.spec import MoEConfig

_PROJ = ("gate_proj", "up_proj", "down_proj")


def routing_of(cfg: MoEConfig) -> MoeRouting:
    return MoeRouting(top_k=cfg.top_k, n_group=cfg.n_group, topk_group=cfg.topk_group,
                      softmax=cfg.scoring == "softmax", norm_topk=cfg.norm_topk, scaling=cfg.scaling)


def route(logits: torch.Tensor, cfg: MoEConfig, bias: torch.Tensor | None = None,
          backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (combine weights [T, k] fp32, expert ids [T, k] int64); the
    torch reference unless ``backend`` says otherwise (kernels.moe_route)."""
    return moe_route(logits, bias, routing_of(cfg), backend)


class Router(nn.Module):
    """``gate.weight`` [E, H] and, for sigmoid routing, ``gate.expert_bias`` [E]."""

    def __init__(self, hidden: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg, self.routing = cfg, routing_of(cfg)
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden))
        # A parameter (not a buffer) so random-weight models initialise it; it is never trained.
        self.expert_bias = nn.Parameter(torch.zeros(cfg.num_experts), requires_grad=False) if cfg.expert_bias else None

    def forward(self, x: torch.Tensor, backend: str = "torch", live_rows: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``backend`` as fused_moe's (kernels.moe_route: one Triton launch on CUDA); rows from
        ``live_rows`` on are padding and route to no expert."""
        if self.cfg.scoring == "softmax":  # Qwen3-MoE: logits in the activation dtype
            return moe_route(F.linear(x, self.weight), self.expert_bias, self.routing, backend, live_rows)
        return gate_and_route(x, self.weight, self.expert_bias, self.routing, backend, live_rows)  # LLaDA2.0: fp32


class ExpertWeights(nn.Module):
    """Stacked expert weights exposed under per-expert checkpoint names; row i of the stacks is
    expert ``first + i`` (expert parallelism holds a range of the model's experts)."""

    def __init__(self, num_experts: int, hidden: int, inner: int, first: int = 0) -> None:
        super().__init__()
        self.num_experts, self.inner, self.first = num_experts, inner, first
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inner, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inner))

    def _views(self, i: int) -> dict[str, torch.Tensor]:
        return {"gate_proj": self.w13[i, :self.inner], "up_proj": self.w13[i, self.inner:], "down_proj": self.w2[i]}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for i in range(self.num_experts):
            for proj, view in self._views(i).items():
                destination[f"{prefix}{self.first + i}.{proj}.weight"] = view if keep_vars else view.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        names = {(i, p): f"{prefix}{self.first + i}.{p}.weight" for i in range(self.num_experts) for p in _PROJ}
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
        self.placed = cfg.placed
        lo, hi = cfg.held
        self.experts = ExpertWeights(hi - lo, hidden, cfg.expert_size, first=lo)
        self.shared_experts = shared
        self.reduce = no_reduce  # once for routed + shared (a shard's shared expert does not reduce)

    def forward(self, x: torch.Tensor, ops=None, live_rows: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H] -> [T, H]. ``ops`` (LayerOps) runs the shared expert's linears; rows from
        ``live_rows`` on (a CUDA graph's padding, AttentionBackend.live_rows) read no expert."""
        backend = self.backend(x)
        weights, ids = self.gate(x, backend, live_rows)
        if self.placed is not None:
            weights, ids = self._here(weights, ids)
        out = fused_moe(x, self.experts.w13, self.experts.w2, weights, ids, backend)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x, ops)
        return self.reduce(out)

    def _here(self, weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing over all experts -> over the ones held here: ids made local, and a pair whose
        expert is another rank's gets id E_here (fused_moe skips it) and weight 0."""
        lo, hi = self.placed
        local = ids - lo
        away = (local < 0) | (local >= hi - lo)
        return weights.masked_fill(away, 0.0), local.masked_fill(away, hi - lo)

    @staticmethod
    def backend(x: torch.Tensor) -> str:
        """As the layer ops (toggles.model_kernels): "auto" is the Triton kernel for CUDA
        inference (graph-safe) and the torch reference elsewhere; "torch" / "triton" force one."""
        return toggles.active().model_kernels

    def fuse_projections(self) -> None:
        if self.shared_experts is not None:
            self.shared_experts.fuse_projections()
