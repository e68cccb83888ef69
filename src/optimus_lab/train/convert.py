"""Converting a pretrained AR model into a block-diffusion one (SDAR-style) with a low-rank adapter.

The base's weights are loaded unchanged into a ``sdar`` model of the same shape (block-causal
attention, the data set's mask id), the projections get low-rank factors (``lora.py``) and the
block-diffusion objective trains them on the data set's rows. What is saved is an adapter
directory (``optimus.models.adapter``) naming the base and the sha256 of its weight file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from optimus.models.adapter import AdapterConfig, write_adapter
from optimus.models.loader import load_model
from optimus.models.sources import resolve_model
from optimus.models.wheels import sha256_of
from optimus_lab.train import checkpoint
from optimus_lab.train.lora import adapter_tensors, add_lora


@dataclass(frozen=True)
class Conversion:
    base: str  # what --model takes: the AR model to convert
    rank: int = 16
    alpha: float = 32.0
    base_name: str | None = None  # the name written into the adapter (e.g. an alias of the same file)


def build(conv: Conversion, ids: dict[str, int], block: int) -> tuple[dict, torch.nn.Module]:
    """(the converted model's config.json, the fp32 model with low-rank factors) on the CPU."""
    loaded = load_model(conv.base, dtype="float32", device="cpu", progress=False)
    if loaded.spec.attention.value != "causal":
        raise ValueError(f"{conv.base} is a {loaded.spec.family} model; conversion starts from a causal LM")
    config = checkpoint.sdar_config(loaded.spec.arch, block, ids["mask_id"], ids["eos_id"], ids["fill_id"],
                                    ids["fill_id"])
    model = checkpoint.build_model(config)
    model.load_state_dict(loaded.model.state_dict(), strict=True)
    add_lora(model, conv.rank, conv.alpha)
    return config, model


def save(conv: Conversion, config: dict, model: torch.nn.Module, out_dir: Path) -> None:
    location = resolve_model(conv.base, progress=False).location
    sha = sha256_of(location) if location.is_file() else None
    cfg = AdapterConfig(conv.base_name or conv.base, sha, conv.rank, conv.alpha)
    write_adapter(out_dir, cfg, adapter_tensors(model), config, checkpoint.generation_config(config))
