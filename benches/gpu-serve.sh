#!/usr/bin/env bash
# GPU serving figures: bare engine inference at batch 1 and 64 vs Classify through
# `tlb serve --device cuda:0`, idle and while a `reference` job trains (cifar10-mini).
#   benches/gpu-serve.sh BIN DATASETS_ROOT IMG [INFERENCE_DEVICE]   (figures under $OUT)
# INFERENCE_DEVICE cpu: `--inference-device cpu` (a CPU thread answers while the GPU trains);
# SKIP_ENGINE=1 skips the bare engine benchmark.
set -uo pipefail
BIN=${1:-runs/gpu/tlb}
DATA=${2:-runs/gpu/datasets}
IMG=${3:-runs/gpu/cat32.png}
INF=${4:-}
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
[ -n "${SKIP_ENGINE:-}" ] || for b in 1 64; do
    timeout 100 "$BIN" bench --preset reference --batch $b --steps 10 --device "${INF:-cuda:0}" | tee -a "$OUT/engine.jsonl"
    echo
done
"$BIN" serve --addr 127.0.0.1:0 --device cuda:0 ${INF:+--inference-device "$INF"} --data-dir "$OUT/data" --datasets-root "$DATA" \
    >"$OUT/serve.out" 2>"$OUT/serve.log" &
PID=$!
echo "== inference on ${INF:-the training device, between steps}"
for _ in $(seq 100); do grep -q "listening on" "$OUT/serve.out" && break; sleep 0.2; done
S="--server http://$(sed -n 's/^tlb listening on //p' "$OUT/serve.out")"
JOB=$("$BIN" train $S --preset reference --format cifar10 --dataset cifar10-mini --epochs 60)
for _ in $(seq 120); do "$BIN" checkpoints $S "$JOB" | grep -q best && break; sleep 1; done
echo "== while training"
timeout 90 "$BIN" bench-serve $S --model "$JOB" --image "$IMG" --batch 1 --requests 60 | tee -a "$OUT/serve-bench.jsonl"
"$BIN" jobs $S "$JOB" | grep -E "state|epochs_completed"
"$BIN" cancel $S "$JOB"
echo "== idle"
for b in 1 64; do
    timeout 60 "$BIN" bench-serve $S --model "$JOB" --image "$IMG" --batch $b --requests 100 | tee -a "$OUT/serve-bench.jsonl"
done
kill -TERM $PID
wait $PID
echo "server exit: $?"
