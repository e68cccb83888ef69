#!/usr/bin/env bash
# Before/after of one change on the same card in one device call (from the repo root):
#   BASE=path/to/the/older/src OUT=/some/dir bash benchmarks/gpu_before_after.sh
# Times the LLaDA-8B 4-tokens-a-step schedule and Llama-8B AR at batch 1/8/32, then the SDAR-8B
# policy sweep, with this tree's code ("after") and BASE's ("before"), interleaved back to back
# on the same card. Both sweeps read the one latency profile measured first (by this
# tree), so they differ by code alone. Writes before_*/after_* JSON files to $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
BASE=${BASE:?set BASE to the older src directory}
OUT=${OUT:?set OUT}
ACCEPTANCE=${ACCEPTANCE:-benchmarks/results/cpu/acceptance/latest.json}
SWEEP="--policies fixed:8,fixed:32,elastic,ar --concurrency 1,16,64,256 --repeats 1 --acceptance $ACCEPTANCE"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
bench() {  # bench SRC NAME ARGS...: one `optimus bench offline` run of the code in SRC
  local src=$1 name=$2; shift 2
  PYTHONPATH=$src timeout 150 python -m optimus.cli bench offline "$@" --out "$OUT/$name.json" 2>&1 | grep -v -i warn
}
bench src after_surface --experiments surface --profile "$OUT/latency_surface.json"
rm -f "$OUT"/*.png  # at most 8 files come back from a device call; the sweeps keep theirs
bench src after_offline --experiments schedule4,ar --batches 1,8,32 --ar-shapes llama-8b
bench "$BASE" before_offline --experiments schedule4,ar --batches 1,8,32 --ar-shapes llama-8b
bench src after_sweep --experiments sweep $SWEEP --profile "$OUT/latency_surface.json"
bench "$BASE" before_sweep --experiments sweep $SWEEP --profile "$OUT/latency_surface.json"
