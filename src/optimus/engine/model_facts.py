"""The facts about a loaded model that a front-end needs without the engine at hand (to check,
tokenize and detokenize requests), and the ``EngineClient`` properties that read them. The
engine process's front-ends and the replicas' ingress both receive them once the model loaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelFacts:
    spec: Any  # ModelSpec
    tokenizer: Any  # models.tokenizer.Tokenizer (pickles without its compiled templates)
    max_model_len: int
    model_name: str
    block_size: int


def model_facts(engine) -> ModelFacts:
    """An in-process ``Engine``'s facts; the model's name is the last part of its path."""
    from pathlib import Path
    loaded = engine.loaded
    name = Path(str(loaded.path)).name if hasattr(loaded, "path") else "model"
    return ModelFacts(engine.spec, engine.tokenizer, engine.max_model_len, name, engine.block_size)


class ModelFactsView:
    """``EngineClient``'s model properties, read from ``self._info`` (valid once ready)."""

    _info: ModelFacts | None

    @property
    def tokenizer(self):
        return self._info.tokenizer

    @property
    def spec(self):
        return self._info.spec

    @property
    def max_model_len(self) -> int:
        return self._info.max_model_len

    @property
    def model_name(self) -> str:
        return self._info.model_name

    @property
    def block_size(self) -> int:
        return self._info.block_size
