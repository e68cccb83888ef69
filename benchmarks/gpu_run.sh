#!/usr/bin/env bash
# One device call that reproduces the committed GPU numbers (from the repo root), on any CUDA card:
#   OUT=/some/dir bash benchmarks/gpu_run.sh
# Results land in $OUT under the names of their benchmark folders; to keep them, store each one
# as benchmarks/results/<card>/<benchmark>/latest.json with `python scripts/results_table.py store`
# (docs/results.md says how) and regenerate docs/results.md.
# Optional: BASE=path/to/an/older/src times the schedule-4 and AR cases of that code too, on
# the same card in the same call (a before/after that does not depend on which card came);
# its rows go to stdout.
# Sections run most-important first, each under its own time limit; results land in $OUT as
# they finish, so a cut-off run still returns what it measured. At most 8 files come back
# from the device (these are 8: policy_sweep.json + .png, latency_surface.json + .png,
# offline_table.json, step_profile.json, attention_micro.json, skinny_micro.json), so logs
# go to stdout.
set -o pipefail
export PYTHONPATH=src:tests PYTHONUNBUFFERED=1  # tests/: the tiny models gpu_check runs
OUT=${OUT:?set OUT}
ACCEPTANCE=${ACCEPTANCE:-benchmarks/results/cpu/acceptance/latest.json}
EXP="python -m optimus.bench.experiments"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
timeout 45 $EXP.gpu_check /tmp/gpu_check.json 2>&1 | tail -8
timeout 300 python -m optimus.cli bench offline --experiments surface,sweep --repeats 3 \
  --policies fixed:8,fixed:16,fixed:32,elastic,fixed:4,ar --concurrency 1,16,64,256 \
  --acceptance "$ACCEPTANCE" --profile "$OUT/latency_surface.json" --out "$OUT/policy_sweep.json" 2>&1 | grep -v -i warn
timeout 160 python -m optimus.cli bench offline --experiments schedule4,ar --batches 1,8,32 --cache-modes dual-cache,prefix-block \
  --ar-shapes llama-8b --out "$OUT/offline_table.json" 2>&1 | grep -v -i warn
if [ -n "$BASE" ]; then
  mkdir -p /tmp/base && timeout 80 env PYTHONPATH="$BASE" python -m optimus.cli bench offline \
    --experiments schedule4,ar --batches 1,32 --ar-shapes llama-8b --out /tmp/base/offline.json 2>&1 \
    | grep -v -i warn
  python -c "import json; d = json.load(open('/tmp/base/offline.json'))
for k in ('schedule4', 'ar'):
    for r in d.get(k, []): print('base', r['shape'], r['policy'], 'batch', r['batch'], round(r['output_tok_s'], 1), 'tok/s')"
fi
timeout 70 $EXP.step_profile --out "$OUT/step_profile.json" 2>&1 | grep -v -i warn
timeout 45 $EXP.attention_micro --out "$OUT/attention_micro.json" 2>&1 | tail -30
timeout 40 python -m optimus.cli bench offline --experiments matmul --out /tmp/matmul.json 2>&1 | grep -v -i warn
timeout 60 $EXP.skinny_micro --rows 1,8 --out "$OUT/skinny_micro.json" 2>&1 | grep -v -i warn
# In-engine A/B of the kernel options (its own call: ~3 min): python -m optimus.bench.experiments.ab_kernels --out ab_kernels.json
