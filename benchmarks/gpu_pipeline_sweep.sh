#!/usr/bin/env bash
# One device call: the SDAR-8B-shape policy sweep under the real-8b acceptance regime, every
# policy whole, in pipelined halves (NAME+pipeline) and where the latency curve says halves pay
# (NAME+auto), median of 3 runs per point, with
# each row's wall time over its steps' device time (wall_over_device):
#   OUT=/some/dir CONC=128,256 bash benchmarks/gpu_pipeline_sweep.sh
# Eleven policies at two loads fill one 10-minute call (estimated from the earlier sweeps' rates);
# run the other loads (CONC=1,4,16,64) in a second call.
# Store the result with `python scripts/results_table.py store <card> policy_sweep_real8b ...`.
set -o pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT}
CONC=${CONC:-128,256}
POLICIES=${POLICIES:-ar,fixed:2,fixed:4,fixed:8,fixed:16,fixed:32,elastic,ar+auto,fixed:4+auto,elastic+auto,elastic+pipeline}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
timeout 560 python -m optimus.cli bench offline --experiments surface,sweep --repeats 3 --gen-len 128 \
  --policies "$POLICIES" --concurrency "$CONC" --acceptance real-8b \
  --profile "$OUT/latency_surface.json" --out "$OUT/policy_sweep_real8b.json" 2>&1 | grep -v -i warn
