#!/usr/bin/env bash
# What serving over HTTP costs against the engine alone, at the SDAR-8B shape on one GPU (run
# from the repo root; one policy per call keeps each call under ten minutes):
#   POLICY=ar OUT=/some/dir bash benchmarks/gpu_http_bench.sh
#   POLICY=fixed:8 OUT=/some/dir bash benchmarks/gpu_http_bench.sh
#   POLICY=elastic OUT=/some/dir bash benchmarks/gpu_http_bench.sh
# `optimus bench http` runs the same closed loop (N streaming clients, each keeping one request
# of 256 prompt + 256 answer tokens in flight; 2 measured waves of N after unmeasured waves
# repeated, at most 3, until one captures no CUDA graph) on the engine in-process, detokenizing
# as a server does, then over HTTP against `optimus serve` (engine process + front-ends) started
# with the same engine flags, at N = 64, 256, 1024.
# Random weights commit per step what the default model's measured acceptance says
# (--replay-acceptance; ACCEPTANCE=real-8b replays the regime of real 8B dLLMs instead); elastic plans
# on the committed latency profile of the card found (CARD overrides). Each row is
# saved as soon as it is measured, so a call cut short by its limit keeps what it finished.
# Results land in $OUT/$TAG (default: the policies without ':' and ',', e.g. ar-fixed8).
# Both sides capture every CUDA-graph bucket at start-up (--graph-precapture, as the serving
# sweep): with lazy capture, warm-up waves did not always meet every bucket a measured run meets
# (an H100, 2026-12-06, real-8b: elastic's in-process run at 64 streams captured 1.26 s of graphs
# inside its measured waves, and fixed:8's HTTP run 0.11 s in each of three calls).
# ENGINE_ARGS adds engine flags to both runs, LIMIT_S bounds the call. On H100s (2026-12-05) one
# policy at 64/256/1024 took 240 s (elastic) to over 420 s (ar, whose 1,024-stream HTTP side was
# cut there); fixed:8 at 1,024 streams alone took 260 s. Keep LIMIT_S near 560, or split CONCURRENCY.
#
# Needs pyzmq and msgpack besides the server stack: wheels in .whl/ (gitignored; carry it) are
# installed into a scratch folder only if an import fails.
set -o pipefail
OUT=${OUT:?set OUT}
POLICY=${POLICY:?set POLICY (ar, fixed:8 or elastic)}
MODEL=${MODEL:-random:sdar-8b}
CONCURRENCY=${CONCURRENCY:-64,256,1024}
if [ -z "$CARD" ]; then  # the stored latency surface of the GPU found (as gpu_policy_regimes.sh)
  case "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)" in
    *H100*) CARD=h100 ;; *) CARD=h200 ;;
  esac
fi
ACCEPTANCE=${ACCEPTANCE:-benchmarks/results/cpu/acceptance/latest.json}
PROFILE=${PROFILE:-benchmarks/results/$CARD/latency_surface/latest.json}
PROFILE_ARG=""
[ -f "$PROFILE" ] && PROFILE_ARG="--profile-path $PROFILE"
SERVER_ARGS=${SERVER_ARGS:-}
ENGINE_ARGS=${ENGINE_ARGS:-}  # more engine flags for both runs, e.g. "--graph-capture all"
TAG=${TAG:-$(echo "$POLICY" | tr -d : | tr , -)}  # $OUT/<TAG> (no commas: they do not come back from $OUT)
LIMIT_S=${LIMIT_S:-590}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=src
STACK="import fastapi, uvicorn, prometheus_client, httpx, zmq, msgpack"
if ! "$PY" -c "$STACK" 2>/dev/null; then
  timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/optimus-site .whl/*.whl || exit 1
  export PYTHONPATH=src:/tmp/optimus-site
fi
timeout 60 "$PY" -c "$STACK, torch; print('torch', torch.__version__, 'zmq', zmq.__version__)" || exit 1
DIR="$OUT/$TAG"
mkdir -p "$DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$DIR/gpu.txt"
timeout "$LIMIT_S" "$PY" -m optimus.cli bench http --model "$MODEL" --policies "$POLICY" --concurrency "$CONCURRENCY" \
  --input-len 256 --output-len 256 --waves 2 --startup-timeout 240 \
  --engine-args "--replay-acceptance $ACCEPTANCE $PROFILE_ARG --graph-precapture --max-running 1024 --max-waiting 1024 $ENGINE_ARGS" \
  --server-args "$SERVER_ARGS" --out "$DIR" 2>&1 | tee "$DIR/bench.log"
tar czf "$DIR/server_logs.tar.gz" -C "$DIR" logs && rm -r "$DIR/logs"
