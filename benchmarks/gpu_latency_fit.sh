#!/usr/bin/env bash
# One device call: the step-latency surface over batch x chunk at the LLaDA2.0-mini MoE shape and
# the dense LLaDA-8B shape (random weights, cache 256, CUDA-graph path), and the held-out error
# of each latency model (tokens, experts touched, either fit alone):
#   OUT=/some/dir bash benchmarks/gpu_latency_fit.sh
# Store with `python scripts/results_table.py store <card> latency_fit_llada2 $OUT/llada2-mini/latency_fit.json
#   $OUT/llada2-mini/latency_fit.png --source "DATE COMMIT"` (and latency_fit_llada8b from $OUT/llada-8b).
set -o pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
for shape in llada2-mini llada-8b; do
  timeout 280 python -m optimus.cli bench latency-fit --shape "$shape" --batches 1,2,4,8,16,32,64,128,256 \
    --chunks 1,2,4,8,16,32 --out "$OUT/$shape" 2>&1 | grep -v -i warn
done
