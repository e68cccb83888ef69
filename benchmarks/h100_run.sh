#!/usr/bin/env bash
# One device call that reproduces the committed H100 numbers of issue 5 (from the repo root):
#   OUT=/some/dir bash benchmarks/h100_run.sh
# Optional: BASE=path/to/an/older/src times the schedule-4 and AR cases of that code too, on
# the same card in the same call (a before/after that does not depend on which card came).
# Sections run most-important first, each under its own time limit; results land in $OUT as
# they finish, so a cut-off run still returns what it measured. At most 8 files come back
# from the device, so logs go to stdout and the base run keeps only its JSON.
set -o pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT}
ACCEPTANCE=${ACCEPTANCE:-benchmarks/results/cpu/acceptance/latest.json}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
timeout 45 python benchmarks/gpu_check.py /tmp/gpu_check.json 2>&1 | tail -8
timeout 300 python -m optimus.cli bench offline --experiments surface,sweep --repeats 3 \
  --policies fixed:8,fixed:16,fixed:32,elastic,fixed:4,ar --concurrency 1,16,64,256 \
  --acceptance "$ACCEPTANCE" --profile "$OUT/profile.json" --out "$OUT/offline.json" 2>&1 | grep -v -i warn
timeout 100 python -m optimus.cli bench offline --experiments schedule4,ar --batches 1,8,32 \
  --ar-shapes llama-8b --out "$OUT/offline.json" 2>&1 | grep -v -i warn
if [ -n "$BASE" ]; then
  mkdir -p /tmp/base && timeout 80 env PYTHONPATH="$BASE" python -m optimus.cli bench offline \
    --experiments schedule4,ar --batches 1,32 --ar-shapes llama-8b --out /tmp/base/offline.json 2>&1 \
    | grep -v -i warn; cp /tmp/base/offline.json "$OUT/offline_base.json"
fi
timeout 70 python benchmarks/step_profile.py --out "$OUT/step_profile.json" 2>&1 | grep -v -i warn
timeout 45 python benchmarks/attention_micro.py --out "$OUT/attention_micro.json" 2>&1 | tail -30
timeout 40 python -m optimus.cli bench offline --experiments matmul --out /tmp/matmul.json 2>&1 | grep -v -i warn
timeout 60 python benchmarks/skinny_micro.py --rows 1,8 --out "$OUT/skinny_micro.json" 2>&1 | grep -v -i warn
# In-engine A/B of the kernel options (its own call: ~3 min): python benchmarks/ab_kernels.py --out ab_kernels.json
