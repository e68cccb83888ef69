#!/usr/bin/env bash
# One device call: FP8 weights (--quantization fp8) against bf16 on one card.
#   OUT=/some/dir bash benchmarks/gpu_fp8.sh
# (1) the FP8 linear kernel on the 8B projection shapes at 1-1024 rows: time, weight TB/s,
#     TFLOP/s and error, against cuBLAS bf16 and the bf16 skinny kernel (--sweep: tile configs);
# (2) schedule4 (LLaDA-8B shape) and AR (Llama-8B shape) at batch 1, 8, 32, bf16 then fp8.
# Store with `python scripts/results_table.py store <card> fp8_speed $OUT/fp8_offline.json ...`.
set -o pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
timeout 200 python -m optimus.bench.experiments.fp8_micro --out "$OUT/fp8_micro.json" ${SWEEP:+--sweep} 2>&1 | grep -v -i warn
for q in bf16 fp8; do
  timeout 170 python -m optimus.cli bench offline --experiments schedule4,ar --batches 1,8,32 --ar-shapes llama-8b \
    $([ "$q" = fp8 ] && echo --quantization fp8) --out "$OUT/offline_$q.json" 2>&1 | grep -v -i warn
done
