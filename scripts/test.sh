#!/usr/bin/env bash
# The project's test command (README): install with test extras on the CPU torch, run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# The CPU build of torch: on Linux, PyPI's torch is the multi-GB CUDA build. The CPU index is
# an extra one, so PyPI (or a machine's own index) still serves everything else, and torch
# too where the CPU index cannot be reached. A torch 2.13.0 already installed (a CUDA build
# on a GPU machine) satisfies the pin and is kept.
# One retry: where the CPU index cannot be reached, pip's default five retries per package
# (with back-off) only delay the fallback to PyPI by a minute or more.
python -m pip install -q --retries 1 --timeout 10 "torch==2.13.0" --extra-index-url https://download.pytorch.org/whl/cpu
python -m pip install -q -e ".[test]"
python -m pytest "$@"
