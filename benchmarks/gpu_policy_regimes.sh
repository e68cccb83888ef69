#!/usr/bin/env bash
# Elastic against every single policy in one acceptance regime, on one GPU (from the repo root):
#   REGIME=real-8b CONCURRENCY=1,4,16,64 CARD=h200 OUT=/some/dir bash benchmarks/gpu_policy_regimes.sh
#   REGIME=real-8b CONCURRENCY=128,256   CARD=h200 OUT=/some/dir bash benchmarks/gpu_policy_regimes.sh
# REGIME: tasks | prose | smollm2-prose | real-8b (docs/policies.md) or an acceptance JSON.
# Random bf16 weights at SHAPE (sdar-8b; llada-8b runs its default dual cache), prompt 256,
# output GEN (128), block 32; every point the median of REPEATS (3) interleaved runs after a
# warm-up; elastic plans from the card's stored latency surface. The sweep rewrites its JSON
# after each load, so a call cut off by LIMIT_S keeps the loads it finished. On an H100
# (2026-12-06, real-8b, seven policies) loads 1-64 took ~150 s and 128-256 ~300 s: split them
# into two calls. The result lands in $OUT/<shape>_<regime>_<loads>.json (no commas: they do
# not come back from the device).
set -o pipefail
OUT=${OUT:?set OUT}
REGIME=${REGIME:?set REGIME (tasks, prose, smollm2-prose, real-8b or a file)}
CONCURRENCY=${CONCURRENCY:-1,4,16,64}
CARD=${CARD:-h200}
SHAPE=${SHAPE:-sdar-8b}
GEN=${GEN:-128}
REPEATS=${REPEATS:-3}
LIMIT_S=${LIMIT_S:-280}
POLICIES=${POLICIES:-ar,fixed:2,fixed:4,fixed:8,fixed:16,fixed:32,elastic}
PROFILE=${PROFILE:-benchmarks/results/$CARD/latency_surface/latest.json}
export PYTHONPATH=src PYTHONUNBUFFERED=1
mkdir -p "$OUT"
name="${SHAPE}_$(basename "$REGIME" .json)_$(echo "$CONCURRENCY" | tr , -)"
timeout "$LIMIT_S" python -m optimus.cli bench offline --experiments sweep --sweep-shape "$SHAPE" --gen-len "$GEN" \
  --acceptance "$REGIME" --profile "$PROFILE" --concurrency "$CONCURRENCY" --repeats "$REPEATS" \
  --policies "$POLICIES" --out "$OUT/$name.json" 2>&1 | grep -v -i warn
rm -f "$OUT"/*.png  # the eight files that come back are for the JSONs; plots are drawn from them here
