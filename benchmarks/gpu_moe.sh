#!/usr/bin/env bash
# One device call: the MoE kernels and shapes (python -m optimus.bench.experiments.moe_check):
# accuracy of both expert paths and the routing kernel's tests, decode expert and routed-layer
# timings against their weight-read floors, schedule4 on llada2-mini and llada-8b, then
# llada2-mini again with steps up to 2,048 tokens served from CUDA graphs (batch 32 runs eagerly
# at the default limit: host-bound, docs/models.md).
#   OUT=/some/dir bash benchmarks/gpu_moe.sh
# Store with `python scripts/results_table.py store <card> moe_check $OUT/moe_check.json $OUT/moe.log
#   --source "DATE COMMIT"`.
set -o pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
timeout 120 python -m pytest -q -o addopts="" tests/test_moe_route.py tests/test_fused_moe.py 2>&1 | tail -3
timeout 300 python -m optimus.bench.experiments.moe_check --out "$OUT" 2>&1 | grep -v -i -e warn -e graphs | tee "$OUT/moe.log"
timeout 150 python -m optimus.bench.experiments.moe_check --out "$OUT" --parts schedule4 --schedule4-shapes llada2-mini \
  --graph-max-tokens 2048 2>&1 | grep -v -i -e warn -e graphs | tee -a "$OUT/moe.log"
