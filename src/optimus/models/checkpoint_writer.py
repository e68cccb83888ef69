"""Write models as Hugging Face directories in their family's layout (training, conversions, tests)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from optimus.models.loader import ConfigFieldError, LoadError, resolve_dtype
from optimus.models.registry import family_for, spec_from_config
from optimus.models.transformer import DecoderLM


def write_safetensors(tensors: dict[str, torch.Tensor], directory: Path, shards: int = 1) -> None:
    """One ``model.safetensors``, or ``shards`` files plus ``model.safetensors.index.json``."""
    names = list(tensors)
    if shards <= 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    per = -(-len(names) // shards)  # ceil: every shard but the last holds `per` tensors
    weight_map: dict[str, str] = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s * per:(s + 1) * per]}
        save_file(part, str(directory / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")


def save_checkpoint(model: DecoderLM, config: dict[str, Any], directory: str | Path, shards: int = 1,
                    dtype: str | torch.dtype | None = None, tokenizer_dir: str | Path | None = None) -> Path:
    """Write ``model`` as an HF directory in its family's layout (``config`` is its config.json).

    Tensor names go through the family's ``export`` map; a tied head is not written (HF style).
    ``tokenizer_dir`` copies the tokenizer and generation config files from another directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    family = family_for(config)
    if spec_from_config(config).arch != model.spec.arch:
        raise ConfigFieldError("config does not describe this model's architecture")
    cast = None if dtype is None else resolve_dtype(dtype, torch.device("cpu"))
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if model.spec.arch.tie_embeddings and name == "lm_head.weight":
            continue
        theirs = family.export(name)
        if theirs is None:
            raise LoadError(f"parameter {name!r} has no name in the {family.name} checkpoint layout")
        tensor = tensor.detach().to("cpu", cast or tensor.dtype).contiguous()
        tensors[theirs] = tensor
    write_safetensors(tensors, directory, shards)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer_dir is not None:
        for fname in _TOKENIZER_FILES:
            src = Path(tokenizer_dir) / fname
            if src.is_file():
                shutil.copyfile(src, directory / fname)
    return directory
