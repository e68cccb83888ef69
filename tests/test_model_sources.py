"""``--model`` names: Hugging Face Hub ids resolved from a Hub cache laid out as huggingface_hub
lays it out (offline, no network), remote code never run, and one clear line per failure."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

from optimus.cli import main
from optimus.models import hub
from optimus.models.errors import (
    HubAccessError, LoadError, MissingFileError, OfflineError, RepoNotFoundError, UnknownArchitectureError,
)
from optimus.models.loader import load_model
from optimus.models.sources import SourceKind, resolve_model
from fixtures import make_tiny_checkpoint
from fixtures.hub_cache import COMMIT, HUB_REPOS, cache_repo


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """HF_HOME in tmp with HF_HUB_OFFLINE=1: the Hub cache is the only source."""
    for var in ("HF_HUB_CACHE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_fetched", {})
    return tmp_path / "hf" / "hub"


@pytest.mark.parametrize("family", sorted(HUB_REPOS))
def test_hub_id_loads_from_the_cache_without_running_remote_code(family, offline_hub, tmp_path):
    repo_id = HUB_REPOS[family][0]
    marker = tmp_path / "remote-code-ran"
    snapshot = cache_repo(offline_hub, repo_id, family, marker)
    loaded = load_model(repo_id, dtype="float32", device="cpu", progress=False)
    assert loaded.spec.family == family
    assert loaded.path == Path(repo_id) and loaded.path.name == repo_id.split("/")[1]
    direct = load_model(snapshot, dtype="float32", device="cpu", progress=False)
    assert all((a == b).all() for a, b in zip(loaded.model.state_dict().values(), direct.model.state_dict().values()))
    assert not marker.exists()


def test_the_hub_fetch_list_takes_no_code_and_no_pickles():
    names = ["config.json", "model-00001-of-00006.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "vocab.json", "chat_template.jinja", "modeling_llada.py", "configuration_sdar.py",
             "tokenization_dream.py", "pytorch_model.bin", "original/consolidated.00.pth", "onnx/model.safetensors"]

    def fetched(name: str) -> bool:
        allowed = any(fnmatch.fnmatch(name, p) for p in hub.HUB_FILES)
        return allowed and not any(fnmatch.fnmatch(name, p) for p in hub._SUBFOLDERS)

    assert [n for n in names if fetched(n)] == names[:6]


def test_offline_without_a_cached_copy_says_so(offline_hub):
    with pytest.raises(OfflineError) as info:
        resolve_model("some-org/missing-model")
    message = str(info.value)
    assert "HF_HUB_OFFLINE is set" in message and str(offline_hub) in message
    assert "some-org/missing-model" in message and "\n" not in message


def test_cli_prints_one_line_and_exits_2(offline_hub, capsys):
    for command in (["generate", "--prompt", "x"], ["serve", "--port", "0"]):
        assert main([*command, "--model", "some-org/missing-model"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "has no copy of some-org/missing-model" in err, err


def test_unsupported_architecture_lists_the_supported_ones(offline_hub, tmp_path):
    snapshot = cache_repo(offline_hub, "org/gpt2-like", "llama", tmp_path / "m", model_type="gpt2",
                          architectures=["GPT2LMHeadModel"])
    for weights in snapshot.glob("*.safetensors"):
        weights.unlink()  # the architecture is refused before any weight is looked for
    with pytest.raises(UnknownArchitectureError) as info:
        resolve_model("org/gpt2-like")
    assert "model_type='gpt2'" in str(info.value)
    for name in ("llada", "dream", "sdar", "llama", "LLaDAModelLM", "DreamModel", "SDARForCausalLM"):
        assert name in str(info.value)


def test_revision_names_a_cached_ref(offline_hub, tmp_path):
    snapshot = cache_repo(offline_hub, "org/tiny", "llama", tmp_path / "m")
    (snapshot.parents[1] / "refs" / "v1").write_text(COMMIT)
    assert resolve_model("org/tiny", revision="v1").location == snapshot
    with pytest.raises(OfflineError, match="org/tiny@v2"):
        resolve_model("org/tiny", revision="v2")
    with pytest.raises(LoadError, match="--revision v1 applies to Hugging Face Hub ids"):
        resolve_model(str(snapshot), revision="v1")


def _hub_error(name: str) -> Exception:
    """A huggingface_hub HTTP error as the library raises it (built without an HTTP response)."""
    from huggingface_hub import errors

    cls = getattr(errors, name)
    exc = cls.__new__(cls)
    Exception.__init__(exc, f"{name}: 401 Client Error")
    return exc


@pytest.mark.parametrize("error, expected, words", [
    ("RepositoryNotFoundError", RepoNotFoundError, "no model repository org/name on the Hugging Face Hub"),
    ("GatedRepoError", HubAccessError, "gated repository"),
    ("RevisionNotFoundError", HubAccessError, "has no revision"),
])
def test_hub_errors_become_one_line(error, expected, words, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(kwargs)
        raise _hub_error(error)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub, "_fetched", {})
    with pytest.raises(expected) as info:
        resolve_model("org/name")
    assert words in str(info.value) and "\n" not in str(info.value)
    if error == "GatedRepoError":
        assert "set HF_TOKEN" in str(info.value)
    # config.json alone is asked for first: nothing large is fetched before the family is known
    assert calls[0]["allow_patterns"] == ["config.json"] and calls[0]["cache_dir"] == str(tmp_path / "hub")


def test_a_cached_copy_is_used_when_the_hub_is_unreachable(tmp_path, monkeypatch):
    """Online mode with no network: huggingface_hub falls back to the cached snapshot."""
    import huggingface_hub

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_fetched", {})
    snapshot = cache_repo(tmp_path / "hf" / "hub", "org/tiny", "llama", tmp_path / "m")
    real = huggingface_hub.snapshot_download
    seen = []

    def unreachable(repo_id, **kwargs):  # what the library does when the Hub cannot be reached
        seen.append(kwargs["local_files_only"])
        return real(repo_id, **{**kwargs, "local_files_only": True})

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    assert resolve_model("org/tiny").location == snapshot
    assert resolve_model("org/tiny").location == snapshot and len(seen) == 2  # fetched once per process
    assert seen == [False, False]


def test_local_names(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "m", "llama")
    assert resolve_model(str(path)).kind is SourceKind.DIRECTORY
    assert resolve_model("random:llama-8b").kind is SourceKind.RANDOM
    with pytest.raises(MissingFileError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "absent.gguf"))
    with pytest.raises(MissingFileError, match="model directory not found"):
        resolve_model(str(tmp_path / "a" / "b" / "c"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LoadError, match="neither a model directory nor a GGUF file"):
        resolve_model(str(tmp_path / "notes.txt"))
