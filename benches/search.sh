#!/usr/bin/env bash
# ASHA beside a grid over the same space, on one server: the epochs each spends and the best
# validation accuracy each finds (hyper-parameters chosen on the validation split only).
# Prints both searches' tables and one JSON line per search.
#   TLB_BIN          the tlb binary (default target/release/tlb, built if missing)
#   TLB_SHARED_DATA  folder holding the dataset (default ../shared/data)
#   DATASET          a CIFAR-10 folder under it (default cifar10-mini)
#   PRESET, SPACE, MIN_EPOCHS, MAX_EPOCHS, ETA: the search (defaults below: 12 configurations
#                    of cpu-small at batch 32, rungs of 3, 9 and 27 epochs)
set -euo pipefail
cd "$(dirname "$0")/.."
TLB="${TLB_BIN:-target/release/tlb}"
[ -x "$TLB" ] || cargo build --release --quiet
DATA="${TLB_SHARED_DATA:-$(cd .. && pwd)/shared/data}"
DATASET="${DATASET:-cifar10-mini}"
PRESET="${PRESET:-cpu-small}"
SPACE="${SPACE:-lr=[5e-4,1.5e-3,4.5e-3] chunk_size=[4,16] r=[1,2] batch_size=[32]}"
MIN_EPOCHS="${MIN_EPOCHS:-3}" MAX_EPOCHS="${MAX_EPOCHS:-27}" ETA="${ETA:-3}"

WORK=$(mktemp -d)
"$TLB" serve --addr 127.0.0.1:0 --data-dir "$WORK/data" --datasets-root "$DATA" \
    >"$WORK/stdout" 2>"$WORK/server.log" &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 100); do
    grep -q "listening on" "$WORK/stdout" 2>/dev/null && break
    sleep 0.1
done
S="http://$(sed -n 's/^tlb listening on //p' "$WORK/stdout")"
common=(--server "$S" --preset "$PRESET" --dataset "$DATASET" --space "$SPACE" --max-concurrent 1)

summary() { # summary NAME SECONDS: one JSON line from `tlb search show`'s headline
    local line
    line=$("$TLB" search show --server "$S" "$(head -1 "$WORK/$1.out")" | head -1)
    python3 - "$1" "$2" "$line" <<'PY'
import json, re, sys
name, seconds, line = sys.argv[1], float(sys.argv[2]), sys.argv[3]
epochs = re.search(r"epochs (\d+)/(\d+)", line)
best = re.search(r"best: trial (\d+) ([\d.]+)% at (\d+) epochs", line)
print(json.dumps({"search": name, "epochs": int(epochs.group(1)), "budget": int(epochs.group(2)),
                  "best_trial": int(best.group(1)), "best_val_accuracy": float(best.group(2)),
                  "best_epochs": int(best.group(3)), "seconds": round(seconds)}))
PY
}

t0=$(date +%s)
"$TLB" search start "${common[@]}" --asha --min-epochs "$MIN_EPOCHS" --max-epochs "$MAX_EPOCHS" \
    --eta "$ETA" >"$WORK/asha.out" 2>/dev/null
t1=$(date +%s)
"$TLB" search start "${common[@]}" --grid --epochs "$MAX_EPOCHS" --max-minutes 0 \
    >"$WORK/grid.out" 2>/dev/null
t2=$(date +%s)
tail -n +2 "$WORK/asha.out"
tail -n +2 "$WORK/grid.out"
summary asha $((t1 - t0))
summary grid $((t2 - t1))
