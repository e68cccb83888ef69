"""Fetch a model repository from the Hugging Face Hub into its cache, files the loader reads only.

``fetch_repo("org/name")`` first fetches config.json alone and checks the family (so an
unsupported model costs no weight download), then the weights, tokenizer and generation files
(:data:`HUB_FILES`) with ``huggingface_hub``'s progress bars. Python files are never fetched:
the LLaDA, Dream and SDAR repositories ship remote code (config ``auto_map``), and this engine
runs them on its own decoder, mapped by ``model_type`` / ``architectures``.

The environment is read at each call, as ``huggingface_hub`` documents it: ``HF_HUB_CACHE``,
else ``HF_HOME``/hub, else ~/.cache/huggingface/hub; ``HF_TOKEN`` (gated and private repos);
``HF_HUB_OFFLINE=1`` (the cache only). Without network a cached copy is used; without either
the error says so in one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from optimus.models.errors import HubAccessError, OfflineError, RepoNotFoundError, UnknownArchitectureError
from optimus.models.registry import FAMILIES, UnknownArchitectureError as _UnknownArch, family_for

# What the loader reads (models/loader.py, models/tokenizer.py): config, safetensors weights
# and their index, the tokenizer (tokenizer.json, or Dream's vocab.json + merges.txt) with its
# settings and chat template, and generation settings. Top-level files only.
HUB_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
             "chat_template.jinja", "chat_template.json")
_SUBFOLDERS = ("*/*",)  # fnmatch's "*" crosses "/": keep original/, onnx/... out

# One fetch per process: a server resolves its model up front and the engine loads it later.
_fetched: dict[tuple[str, str | None, str], Path] = {}


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def fetch_repo(repo_id: str, revision: str | None = None, progress: bool = True) -> Path:
    """The local snapshot directory of ``repo_id`` at ``revision`` (default: main)."""
    key = (repo_id, revision, str(hub_cache_dir()))
    if key not in _fetched:
        config_dir = _snapshot(repo_id, revision, ("config.json",), progress=False)
        if not (config_dir / "config.json").is_file():
            raise UnknownArchitectureError(f"{_label(repo_id, revision)} has no config.json: not a Hugging Face "
                                           "transformers model repository (a .gguf file is loaded by its path)")
        check_directory_family(config_dir, repo_id)
        _fetched[key] = _snapshot(repo_id, revision, HUB_FILES, progress)
    return _fetched[key]


def check_directory_family(root: Path, name: str) -> None:
    """config.json must name a family this engine runs (a local directory or a Hub snapshot).
    A missing or unreadable config.json is left to the loader, whose errors name the file."""
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(config, dict):
        return
    try:
        family_for(config)
    except _UnknownArch:
        raise UnknownArchitectureError(
            f"{name}: unknown architecture: model_type={config.get('model_type')!r}, "
            f"architectures={config.get('architectures')!r}; supported: {supported_architectures()}") from None


def supported_architectures() -> str:
    return ("model_type " + ", ".join(sorted(FAMILIES)) + " (LLaDA: LLaDAModelLM, Dream: DreamModel, "
            "SDAR: SDARForCausalLM; Llama, Qwen2, Qwen3 causal LMs)")


def _label(repo_id: str, revision: str | None) -> str:
    return repo_id if revision is None else f"{repo_id}@{revision}"


def _snapshot(repo_id: str, revision: str | None, patterns: tuple[str, ...], progress: bool) -> Path:
    """``snapshot_download`` of the files matching ``patterns``, its errors as one line each."""
    import huggingface_hub
    from huggingface_hub import errors

    label, cache = _label(repo_id, revision), hub_cache_dir()
    kwargs = {} if progress else {"tqdm_class": _quiet_tqdm()}
    try:
        path = huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=str(cache), local_files_only=hub_offline(),
            allow_patterns=list(patterns), ignore_patterns=list(_SUBFOLDERS), **kwargs)
    except errors.GatedRepoError:
        token = "HF_TOKEN has no access to it" if os.environ.get("HF_TOKEN") else "set HF_TOKEN"
        raise HubAccessError(f"{label} is a gated repository on the Hugging Face Hub: accept its terms on its "
                             f"page and {token} (a token of an account that was granted access)") from None
    except errors.RepositoryNotFoundError:
        raise RepoNotFoundError(f"no model repository {repo_id} on the Hugging Face Hub (nor a local directory "
                                "of that name); a private repository needs HF_TOKEN") from None
    except errors.RevisionNotFoundError:
        raise HubAccessError(f"{repo_id} has no revision {revision!r} on the Hugging Face Hub") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, ConnectionError) as exc:
        why = "HF_HUB_OFFLINE is set" if hub_offline() else f"the Hugging Face Hub cannot be reached ({_first_line(exc)})"
        raise OfflineError(f"{why} and the cache {cache} has no copy of {label}") from None
    except errors.HfHubHTTPError as exc:
        raise HubAccessError(f"Hugging Face Hub error for {label}: {_first_line(exc)}") from None
    return Path(path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _quiet_tqdm():
    """A tqdm class that shows nothing (``progress=False``)."""
    from tqdm.auto import tqdm

    class Quiet(tqdm):
        def __init__(self, *args, **kwargs) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet
