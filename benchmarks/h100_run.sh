#!/usr/bin/env bash
# One device call that reproduces the committed H100 numbers (run from the repo root):
#   OUT=/some/dir ACCEPTANCE=benchmarks/results/default_model/tau_profile.json bash benchmarks/h100_run.sh
# Sections run most-important first, each under its own time limit; results land in $OUT
# as they finish, so a cut-off run still returns what it measured.
set -o pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT}
ACCEPTANCE=${ACCEPTANCE:?set ACCEPTANCE}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 60 python benchmarks/gpu_check.py "$OUT/gpu_check.json" 2>&1 | tail -8
timeout 120 python -m optimus.cli bench offline --experiments schedule4,ar,matmul --batches 1,8,32 \
  --ar-shapes llama-8b,llada-8b --out "$OUT/offline.json" 2>&1 | grep -v -i warn
timeout 240 python -m optimus.cli bench offline --experiments surface,sweep \
  --policies ar,fixed:4,fixed:8,fixed:16,fixed:32,elastic --concurrency 1,16,64,256 \
  --acceptance "$ACCEPTANCE" --profile "$OUT/profile.json" --out "$OUT/offline.json" 2>&1 | grep -v -i warn
timeout 60 python benchmarks/fused_check.py --out "$OUT/fused_check.json" 2>&1 | tail -25
