#!/usr/bin/env bash
# Elastic against every single policy in one acceptance regime, on one GPU (from the repo root):
#   REGIME=real-8b CONCURRENCY=1,4,16,64 OUT=/some/dir bash benchmarks/gpu_policy_regimes.sh
#   REGIME=real-8b CONCURRENCY=128,256   OUT=/some/dir bash benchmarks/gpu_policy_regimes.sh
# REGIME: tasks | prose | smollm2-prose | real-8b (docs/policies.md) or an acceptance JSON.
# CARD (h100 | h200; default: the GPU's name) picks benchmarks/results/$CARD/latency_surface.
# Random bf16 weights at SHAPE (sdar-8b; llada-8b runs its default dual cache), prompt 256,
# output GEN (128), block 32; every point the median of REPEATS (3) interleaved runs after a
# warm-up; elastic plans from the card's stored latency surface. The sweep rewrites its JSON
# after each load, so a call cut off by LIMIT_S keeps the loads it finished. On an H100
# (2026-12-06, seven policies): real-8b loads 1-64 took 160 s, tasks 74 s; real-8b and tasks
# at 128-256 together 530 s; prose (about one commit a step at every size, so fixed:32 runs
# 32 rows a token) needed over 185 s for 1-16 and over 330 s for 128 alone: give prose one
# call per high load. The result lands in $OUT/<shape>_<regime>_<loads>.json (no commas: they
# do not come back from the device).
# After each load, a fixed size larger than that load's best and below DROP_BELOW (0.5) of it is
# left out of the higher loads (`--drop-below`; its last row says `left_out_above`): a higher
# load only moves the best size down. In prose, fixed:16 and fixed:32 ran at 36% and 21% of ar
# at 64 requests (H100), and were what made 128 alone take over 330 s. A later call does not
# know what an earlier one left out: pass it POLICIES without them.
# PROFILE names the surface elastic plans from (a path not there: the engine measures a brief one at
# start and saves it there, as for an MoE shape, whose stored surface does not exist yet);
# GRAPH_MAX_TOKENS raises the CUDA-graph limit (MoE shapes: steps past it run eagerly).
# REFRESH_WAVE_WAIT (dual cache): steps a due refresh may wait for others to fill a step with it.
# BASE=path/to/an/older/src runs BASE_POLICIES (elastic) of that code too, after this tree's
# sweep, same card and call: $OUT/<name>_base.json, a before/after of a controller change
# against this call's single policies.
set -o pipefail
OUT=${OUT:?set OUT}
REGIME=${REGIME:?set REGIME (tasks, prose, smollm2-prose, real-8b or a file)}
CONCURRENCY=${CONCURRENCY:-1,4,16,64}
# The card's stored latency surface is what elastic plans from: CARD follows the GPU found
# (an H100 run planning on the H200 surface measures a profile from another card instead).
if [ -z "$CARD" ]; then
  case "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)" in
    *H100*) CARD=h100 ;; *H200*) CARD=h200 ;; *) CARD=h200 ;;
  esac
fi
SHAPE=${SHAPE:-sdar-8b}
GEN=${GEN:-128}
REPEATS=${REPEATS:-3}
LIMIT_S=${LIMIT_S:-280}
POLICIES=${POLICIES:-ar,fixed:2,fixed:4,fixed:8,fixed:16,fixed:32,elastic}
PROFILE=${PROFILE:-benchmarks/results/$CARD/latency_surface/latest.json}
DROP_BELOW=${DROP_BELOW:-0.5}  # after each load, leave out the larger fixed sizes below this share of the best
export PYTHONPATH=src PYTHONUNBUFFERED=1
mkdir -p "$OUT"
echo "card $CARD, elastic plans from $PROFILE"
name="${SHAPE}_$(basename "$REGIME" .json)_$(echo "$CONCURRENCY" | tr , -)"
sweep() {  # sweep SRC ACCEPTANCE POLICIES OUT_JSON [FLAGS...]: the sweep with the code in SRC
  local src=$1 acceptance=$2 policies=$3 out=$4
  shift 4
  timeout "$LIMIT_S" env PYTHONPATH="$src" python -m optimus.cli bench offline --experiments sweep \
    --sweep-shape "$SHAPE" --gen-len "$GEN" --acceptance "$acceptance" --profile "$PROFILE" --concurrency "$CONCURRENCY" \
    --repeats "$REPEATS" --policies "$policies" --out "$out" ${GRAPH_MAX_TOKENS:+--graph-max-tokens "$GRAPH_MAX_TOKENS"} \
    ${REFRESH_WAVE_WAIT:+--refresh-wave-wait "$REFRESH_WAVE_WAIT"} \
    "$@" 2>&1 | grep -v -i warn
}
sweep src "$REGIME" "$POLICIES" "$OUT/$name.json" --drop-below "$DROP_BELOW"
if [ -n "$BASE" ]; then  # the older tree replays this tree's profile of the regime (it may lack the file)
  ACCEPTANCE_FILE=$(PYTHONPATH=src python -c "import sys; from optimus.decoding import regimes; print(regimes.resolve(sys.argv[1]))" "$REGIME")
  sweep "$BASE" "$ACCEPTANCE_FILE" "${BASE_POLICIES:-elastic}" "$OUT/${name}_base.json"
fi
rm -f "$OUT"/*.png  # the eight files that come back are for the JSONs; plots are drawn from them here
