#!/usr/bin/env bash
# The GPU check, for a session with a lent device (one call of about 8 minutes on an H200).
# Phases in order of importance, each under its own time limit; a phase that would start after
# $BUDGET seconds (default 430) is skipped, and results are saved after each one:
#   1. `tlb parity` (CPU vs cuda:0: logits, every gradient, 3 AdamW steps) in f32, first: the
#      plain build runs tlb's CubeCL kernels (the attention block, AdamW; src/engine/model/cube),
#      checked so far on lavapipe only; then `tlb bench` `reference` batch 1024 in f32, with the
#      kernels and with burn's composition (`--unfused`);
#   2. the `cuda-fusion` build (burn's fusion, kernels by its heuristics, no tuning): parity,
#      then `reference` batch 1024, f32;
#   2b. the `wgpu` build on the same GPU through Vulkan (`--device wgpu:0`, when tlb-wgpu.xz
#      is given; NVIDIA's Vulkan driver must be there): parity, `reference` batch 1024 and
#      batch 1, f32 (wgpu has no bf16);
#   3. bf16 on the plain build: `reference` batch 1024 and parity;
#   4. `tlb serve --device cuda:0`: 2 `reference` epochs on cifar10-mini through StartTraining,
#      then Classify latency through gRPC at batch 1 and 64 (`tlb bench-serve`);
#   5. a kernel profile (cubecl's own: `cubecl.toml`, profiling level "basic"; every kernel
#      timed, a summary per kernel name at each device sync) of `reference` batch 1024 and
#      batch 1: where a step's time goes on the device;
#   6. `cpu-small` batch 256 and `reference` batch 1 (the engine's latency), f32 and bf16;
#   7. curves: `cpu-small` for 20 epochs on cifar10-mini in f32 and in bf16 (train-local);
#   8. `cuda-autotune` (parity, then `reference` batch 1024 twice: its autotune fills the cache
#      under ./target on the first run, seen taking over 90 s).
#
#   benches/gpu.sh DIR   DIR holds tlb.xz (`cargo build --release --features cuda`, stripped),
#                        tlb-fusion.xz and tlb-autotune.xz (`--features cuda-fusion`,
#                        `cuda-autotune`; optional), tlb-wgpu.xz (`--features wgpu`;
#                        optional), datasets/cifar10-mini/ and cat32.png.
#   DEV=cpu BUDGET=100000 W=/tmp/w OUT=/tmp/o benches/gpu.sh DIR: a dry run of the script on the
#                        CPU (every phase under its limit, about 12 minutes on 2 cores).
# Everything lands in $OUT/results.tgz and $OUT/summary.txt.
set -uo pipefail
DIR=${1:-runs/gpu}
OUT=${OUT:-/tmp/gpu-out}
W=${W:-/tmp/gpu-work}
mkdir -p "$OUT" "$W"
xz -dc "$DIR/tlb.xz" >"$W/tlb" && chmod +x "$W/tlb"
for b in tlb-fusion tlb-autotune tlb-wgpu; do
    [ -f "$DIR/$b.xz" ] && xz -dc "$DIR/$b.xz" >"$W/$b" && chmod +x "$W/$b"
done
BIN=$W/tlb
DATA=$(realpath "$DIR/datasets")
IMG=$(realpath "$DIR/cat32.png")
# Saved after each phase (a temp file renamed, so a run stopped at its limit leaves a whole one).
save() {
    tar czf "$OUT/.results.tgz" -C "$W" --exclude ./tlb --exclude ./tlb-fusion --exclude ./tlb-autotune --exclude ./tlb-wgpu --exclude ./data \
        --exclude checkpoints . && mv "$OUT/.results.tgz" "$OUT/results.tgz"
    cp "$W/summary.txt" "$OUT/summary.txt"
}
log() { echo "$(date +%T) $*" | tee -a "$W/summary.txt"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$W/gpu.txt"
nproc >>"$W/gpu.txt"

export CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}
BUDGET=${BUDGET:-430}
# The device under test (DEV=cpu: a dry run of the script itself on a machine without a GPU).
DEV=${DEV:-cuda:0}
time_left() { [ "$SECONDS" -lt "$BUDGET" ] || { log "skipped (budget): $*"; false; }; }
bench() { # BIN PRESET BATCH STEPS PRECISION LIMIT [--unfused]
    timeout "$6" "$1" bench --preset "$2" --batch "$3" --steps "$4" --device "$DEV" --precision "$5" ${7:-} \
        2>>"$W/bench.err" | sed "s|^{|{\"bin\":\"$(basename "$1")\",|" >"$W/last.json"
    local rc=${PIPESTATUS[0]} # the bench's status (124: it ran out of its time), not sed's
    log "bench $(basename "$1") $2 $3 $5 rc=$rc $(cat "$W/last.json")"
    cat "$W/last.json" >>"$W/bench.jsonl"
}
parity() { # BIN PRECISION LIMIT
    local name=parity-$(basename "$1")-$2
    timeout "$3" "$1" parity --device "$DEV" --precision "$2" --verbose >"$W/$name.jsonl" 2>"$W/$name.err"
    log "$name rc=$? $(tail -1 "$W/$name.jsonl")"
}

time_left "parity f32" && parity "$BIN" f32 60; save
time_left "reference f32" && bench "$BIN" reference 1024 5 f32 80; save
time_left "reference f32 unfused" && bench "$BIN" reference 1024 5 f32 60 --unfused; save
if [ -x "$W/tlb-fusion" ]; then
    time_left "fusion parity" && parity "$W/tlb-fusion" f32 60; save
    time_left "fusion reference" && bench "$W/tlb-fusion" reference 1024 5 f32 60; save
fi
if [ -x "$W/tlb-wgpu" ] && [ "$DEV" != cpu ]; then
    DEV_CUDA=$DEV
    DEV=wgpu:0
    time_left "wgpu parity" && parity "$W/tlb-wgpu" f32 60; save
    time_left "wgpu reference" && bench "$W/tlb-wgpu" reference 1024 5 f32 60; save
    time_left "wgpu reference batch 1" && bench "$W/tlb-wgpu" reference 1 5 f32 30; save
    DEV=$DEV_CUDA
fi
time_left "reference bf16" && bench "$BIN" reference 1024 5 bf16 80; save
time_left "parity bf16" && parity "$BIN" bf16 60; save
if time_left "serving"; then
    log "== server on $DEV: 2 reference epochs on cifar10-mini, then Classify"
    "$BIN" serve --addr 127.0.0.1:0 --device "$DEV" --data-dir "$W/data" --datasets-root "$DATA" \
        >"$W/serve.out" 2>"$W/serve.log" &
    PID=$!
    for _ in $(seq 100); do grep -q "listening on" "$W/serve.out" && break; sleep 0.2; done
    S="--server http://$(sed -n 's/^tlb listening on //p' "$W/serve.out")"
    timeout 90 "$BIN" train $S --preset reference --format cifar10 --dataset cifar10-mini --epochs 2 --watch \
        >"$W/train.txt" 2>&1
    JOB=$(head -1 "$W/train.txt")
    "$BIN" jobs $S "$JOB" >"$W/job.txt"
    log "$(grep -E "state|epochs_completed|test_accuracy" "$W/job.txt" | tr '\n' ' ')"
    "$BIN" classify $S "$IMG" --model "$JOB" >"$W/classify.txt" 2>&1
    for b in 1 64; do
        timeout 40 "$BIN" bench-serve $S --model "$JOB" --image "$IMG" --batch $b --requests 100 \
            | tee -a "$W/serve-bench.jsonl"
        log "classify batch $b: $(tail -1 "$W/serve-bench.jsonl")"
    done
    kill -TERM $PID
    wait $PID
    log "server exit: $?"
fi
save
if time_left "kernel profile"; then
    mkdir -p "$W/profile"
    printf '[profiling.logger]\nlevel = "basic"\nfile = "%s"\n' "$W/profile/cubecl.log" \
        >"$W/profile/cubecl.toml"
    for b in 1024 1; do
        (cd "$W/profile" && timeout 45 "$BIN" bench --preset reference --batch $b --steps 2 \
            --device "$DEV" >"bench-$b.json" 2>"bench-$b.err")
        rc=$?
        if [ -f "$W/profile/cubecl.log" ]; then
            log "profile reference batch $b rc=$rc ($(wc -l <"$W/profile/cubecl.log") log lines)"
            mv "$W/profile/cubecl.log" "$W/profile/cubecl-$b.log"
            xz -T4 "$W/profile/cubecl-$b.log"
        else
            log "profile reference batch $b rc=$rc: no cubecl.log written"
        fi
    done
fi
save
time_left "cpu-small f32" && bench "$BIN" cpu-small 256 20 f32 50; save
time_left "cpu-small bf16" && bench "$BIN" cpu-small 256 20 bf16 50; save
time_left "reference batch 1" && bench "$BIN" reference 1 20 f32 40; save
for p in f32 bf16; do
    time_left "curves $p" || continue
    timeout 60 "$BIN" train-local --preset cpu-small --data "$DATA/cifar10-mini" --epochs 20 \
        --device "$DEV" --precision $p --out "$W/curves-$p" --quiet >"$W/curves-$p.txt" 2>&1
    log "curves $p rc=$? $(tail -2 "$W/curves-$p.txt" | tr '\n' ' ')"
    save
done
if [ -x "$W/tlb-autotune" ]; then
    time_left "autotune parity" && parity "$W/tlb-autotune" f32 150; save
    time_left "autotune reference (tuning)" && bench "$W/tlb-autotune" reference 1024 3 f32 150; save
    time_left "autotune reference (tuned)" && bench "$W/tlb-autotune" reference 1024 5 f32 60; save
fi
log "== done"; save
