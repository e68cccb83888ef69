#!/usr/bin/env bash
# The 8B-shape serving sweep in one device command (run from the repo root), on any CUDA card:
#   OUT=/some/dir bash benchmarks/gpu_serve_sweep.sh
# Its sweep.json is what benchmarks/results/<card>/serve_sweep/latest.json holds (store it with
# `python scripts/results_table.py store`, docs/results.md).
# `optimus bench sweep` starts `optimus serve --model random:sdar-8b` (random bf16 weights at
# the SDAR-8B shape) once per policy and loads it over HTTP at each request rate. Random weights
# have meaningless confidences, so each server commits per step what the measured acceptance
# profile of the shipped default model says (--replay-acceptance; it also seeds elastic's tau)
# and elastic plans on the card's committed latency profile (--profile-path; CARD: the GPU found,
# benchmarks/results/$CARD/latency_surface/latest.json; without that file the server measures one
# on its first start). Every server captures its CUDA graphs at start-up (--graph-precapture),
# so no run pays them. Results are throughput and latency of the serving stack with replayed
# token efficiency, not accuracy.
#
# Server packages the GPU image may lack (fastapi, uvicorn, ...) travel as wheels in .whl/
# (gitignored; carry it), installed into a scratch folder only if an import fails.
#
# MODEL, EXTRA_SERVER_ARGS, POLICIES, RATES, PROMPTS and LIMIT_S (510 s) override the defaults,
# e.g. a CPU smoke run of this script: MODEL=random-tiny:sdar-8b EXTRA_SERVER_ARGS="--device cpu
# --num-pages 256" POLICIES=fixed:8 RATES=50 PROMPTS=4 OUT=/tmp/smoke bash benchmarks/gpu_serve_sweep.sh
# Regime c (few commits per forward, as real 8B dLLMs): ACCEPTANCE=real-8b RATES=20,30,40,50 PROMPTS=256
# (an H200, 2026-12-06: four policies in about 350 s; fixed:32 takes longest). PROMPTS must be well
# above the server's 256 running requests to find a capacity: at 256, elastic, ar and fixed:8 barely
# queued (TTFT p99 under 0.7 s at every rate) and met the SLO at every rate (lower bounds). Output 256 at ar's
# 8,782 tok/s on the H200 (offline, 256 requests) drains about 34 req/s: PROMPTS=768 at
# RATES=25,35,45,55 (31, 22, 17 and 14 s of arrivals a rate) should bracket it, about two
# minutes a policy, so two policies a call.
#
# Time budget (~8 min on an H100; estimate from the offline H100 numbers, docs/gpu.md: a step
# costs ~7.5 ms up to ~256 tokens and ~25 us per token beyond; fixed:8 peaks near 10,000 output
# tok/s at 256 requests, ar near 4,700): 96 requests of 256 prompt + 256 output tokens at
# 12/24/36/48 req/s. Each rate offers 96 / rate seconds of arrivals (8, 4, 2.7, 2 s) plus the
# drain; a fluid model of the offline curves gives ~45 s of load for ar (saturated from
# 24 req/s at ~2,500 tok/s with 96 requests in flight), ~25-30 s for each chunked policy, plus
# one unmeasured warm-up request per rate, plus 20-40 s per server start (8B random init,
# Triton compiles on the first start; CUDA graphs are captured lazily, inside the runs).
# About 60-75 s per policy, 6-7 min in all. The policies run most-important first and
# sweep.json is rewritten after each one, so a run cut off by `timeout` keeps what finished.
set -o pipefail
OUT=${OUT:?set OUT}
MODEL=${MODEL:-random:sdar-8b}
ACCEPTANCE=${ACCEPTANCE:-benchmarks/results/cpu/acceptance/latest.json}
if [ -z "$CARD" ]; then  # the stored latency surface of the GPU found (as gpu_policy_regimes.sh)
  case "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)" in
    *H200*) CARD=h200 ;; *) CARD=h100 ;;
  esac
fi
PROFILE=${PROFILE:-benchmarks/results/$CARD/latency_surface/latest.json}
PROFILE_ARG=""
[ -f "$PROFILE" ] && PROFILE_ARG="--profile-path $PROFILE"
POLICIES=${POLICIES:-elastic,fixed:8,ar,fixed:4,fixed:16,fixed:32}
RATES=${RATES:-32,48,64,96}
PROMPTS=${PROMPTS:-256}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=src
SERVER_STACK="import fastapi, uvicorn, prometheus_client, httpx"
if ! "$PY" -c "$SERVER_STACK" 2>/dev/null; then
  timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/optimus-site .whl/*.whl || exit 1
  export PYTHONPATH=src:/tmp/optimus-site
fi
timeout 60 "$PY" -c "$SERVER_STACK, torch; print('torch', torch.__version__, 'fastapi', fastapi.__version__)" || exit 1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout "${LIMIT_S:-510}" "$PY" -m optimus.cli bench sweep --model "$MODEL" --policies "$POLICIES" --rates "$RATES" \
  --dataset random --input-len 256 --output-len 256 --num-prompts "$PROMPTS" --ignore-eos --warmup 1 \
  --slo ttft:2000,tpot:50 --startup-timeout 180 --disable-tqdm \
  --server-args "--replay-acceptance $ACCEPTANCE $PROFILE_ARG --graph-precapture --log-level warning $EXTRA_SERVER_ARGS" \
  --out-dir "$OUT" 2>&1 | tee "$OUT/sweep.log"
# At most 8 files come back from $OUT: one archive for the per-policy server logs.
tar czf "$OUT/server_logs.tar.gz" -C "$OUT" logs && rm -r "$OUT/logs"
