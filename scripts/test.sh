#!/usr/bin/env bash
# The project's test command (README): install with test extras on the CPU torch, run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
python -m pytest "$@"
