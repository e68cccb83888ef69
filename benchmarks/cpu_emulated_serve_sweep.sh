#!/usr/bin/env bash
# The regime-c serving sweep of benchmarks/gpu_serve_sweep.sh on a CPU, against an emulated card:
#   OUT=/some/dir bash benchmarks/cpu_emulated_serve_sweep.sh
# `optimus serve --emulate-device` runs no forward: each step takes the time the card's own step
# traces give (its offline real-8b sweep: benchmarks/results/$CARD/policy_sweep_real8b), and
# picks random tokens; the replayed acceptance decides the commits and elastic plans on the
# card's stored latency surface, as on the card. Everything else is the served engine: the
# engine process, the HTTP front-end, the streams, the closed-loop controller. What it leaves
# out is the card's own behaviour beyond its step times (CUDA graph buckets, the host of that
# machine). CARD (h200), POLICIES, RATES and PROMPTS override the defaults.
set -euo pipefail
CARD=${CARD:-h200}
OUT=${OUT:-out/emulated_serve_sweep}
mkdir -p "$OUT"
SURFACE=benchmarks/results/$CARD/latency_surface/latest.json
python -m optimus.bench.step_traces "benchmarks/results/$CARD/policy_sweep_real8b/latest.json" "$OUT/device.json"
optimus bench sweep --model random-tiny:sdar-8b --policies "${POLICIES:-ar,elastic,fixed:8}" \
  --rates "${RATES:-20,30,40,50}" --dataset random --input-len 256 --output-len 256 \
  --num-prompts "${PROMPTS:-256}" --ignore-eos --warmup 1 --slo ttft:2000,tpot:50 --startup-timeout 180 \
  --disable-tqdm --server-args "--device cpu --dtype float32 --replay-acceptance real-8b \
  --emulate-device $OUT/device.json --profile-path $SURFACE --num-pages 24000 --log-level warning" \
  --out-dir "$OUT" 2>&1 | tee "$OUT/sweep.log"
