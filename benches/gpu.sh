#!/usr/bin/env bash
# GPU check for a session with a lent device: the `cuda` build's benchmarks, then the server on
# cuda:0 training `reference` for 2 epochs on cifar10-mini and answering Classify.
#   benches/gpu.sh BIN DATASETS_ROOT   (BIN: a stripped `cargo build --release --features cuda`)
# Writes its figures under $OUT (default /tmp/gpu-out).
set -uo pipefail
BIN=${1:-runs/gpu/tlb}
DATA=${2:-runs/gpu/datasets}
IMG=${3:-runs/gpu/cat32.png}
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
for run in "cpu-small 256 30" "reference 256 20" "reference 1024 10"; do
    set -- $run
    echo "== bench $*"
    timeout 100 "$BIN" bench --preset "$1" --batch "$2" --steps "$3" --device cuda:0 \
        2>>"$OUT/bench.err" | tee -a "$OUT/bench.jsonl"
    echo
done

echo "== server on cuda:0"
"$BIN" serve --addr 127.0.0.1:0 --device cuda:0 --data-dir "$OUT/data" --datasets-root "$DATA" \
    >"$OUT/serve.out" 2>"$OUT/serve.log" &
PID=$!
for _ in $(seq 100); do grep -q "listening on" "$OUT/serve.out" && break; sleep 0.2; done
S="--server http://$(sed -n 's/^tlb listening on //p' "$OUT/serve.out")"
timeout 150 "$BIN" train $S --preset reference --format cifar10 --dataset cifar10-mini --epochs 2 --watch \
    >"$OUT/train.txt" 2>&1
cat "$OUT/train.txt"
JOB=$(head -1 "$OUT/train.txt")
"$BIN" jobs $S "$JOB" | tee "$OUT/job.txt" | grep -E "state|epochs_completed|test_accuracy"
"$BIN" classify $S "$IMG" --model "$JOB" | tee "$OUT/classify.txt"
for b in 1 64; do
    timeout 60 "$BIN" bench-serve $S --model "$JOB" --image "$IMG" --batch $b --requests 100 | tee -a "$OUT/serve-bench.jsonl"
done
kill -TERM $PID
wait $PID
echo "server exit: $?"
tail -5 "$OUT/serve.log"
