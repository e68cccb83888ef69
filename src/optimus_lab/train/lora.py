"""Low-rank adaptation for converting a pretrained model: the base stays frozen, each targeted
projection learns ``W + alpha / r * B @ A`` and the norm weights train in full.

Written as a ``torch.nn.utils.parametrize`` of each weight, so every use of ``.weight`` in the
model (its Linears and the explicit ``ops.linear`` calls) sees the adapted matrix. The trained
tensors are what ``optimus.models.adapter`` stores and merges at load time.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from optimus.models.adapter import LORA_A, LORA_B

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LowRankDelta(nn.Module):
    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))  # zero: training starts at the base
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.lora_B @ self.lora_A).to(weight.dtype)


def add_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = TARGETS) -> None:
    """Freeze ``model`` except the new low-rank factors and the 1-D (norm) weights."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            out_f, in_f = module.weight.shape
            parametrize.register_parametrization(module, "weight", LowRankDelta(out_f, in_f, rank, alpha),
                                                 unsafe=True)
    for name, p in model.named_parameters():
        if p.dim() == 1 and "parametrizations" not in name:
            p.requires_grad_(True)


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trained tensors under the plain model's parameter names (``<param>.lora_A`` etc.)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".parametrizations.weight.0." in name:  # <module>.parametrizations.weight.0.lora_A
            module, factor = name.split(".parametrizations.weight.0.")
            out[f"{module}.weight{LORA_A if factor == 'lora_A' else LORA_B}"] = p.detach()
        else:
            out[name] = p.detach()
    return out


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` with every adapted weight merged (for in-process evaluation)."""
    import copy
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    for p in plain.parameters():
        p.requires_grad_(False)
    return plain
