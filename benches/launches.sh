#!/usr/bin/env bash
# Kernel launches per training step and per inference pass on burn's wgpu backend: the figure
# the GPU path's speed hangs on (small tensors, launch-bound), measurable without a GPU (on
# Mesa's lavapipe). cubecl writes one `Executing <kernel>` line per launch to its profiling
# log at the level "minimal", set by a cubecl.toml in the working directory; `tlb bench`
# counts the lines of each phase (TLB_LAUNCH_LOG).
#
#   cargo build --release --features wgpu && benches/launches.sh
#   TLB_BIN=path/to/tlb DEVICE=wgpu:0 benches/launches.sh     # on a GPU
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${TLB_BIN:-target/release/tlb}")
DEVICE=${DEVICE:-wgpu}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cat >"$dir/cubecl.toml" <<TOML
[profiling.logger]
level = "minimal"
file = "$dir/launches.log"
append = true
TOML
echo "# $("$BIN" --version 2>/dev/null || echo tlb), device $DEVICE"
# Each shape with burn's composition (--unfused) and with tlb's fused kernels.
# lavapipe runs `reference` at about one image every 10 s: one step of each is enough (the
# counts do not vary between steps), after the bench's two warm-up steps.
for spec in "reference 1" "cpu-small 1"; do
    set -- $spec
    for fused in --unfused ""; do
        rm -f "$dir/launches.log"
        (cd "$dir" && TLB_LAUNCH_LOG="$dir/launches.log" XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}" \
            "$BIN" bench --device "$DEVICE" --preset "$1" --batch "$2" --steps 1 $fused 2>/dev/null) |
            python3 -c 'import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); print(json.dumps({k: r[k] for k in ("preset","batch","fused","train_launches_per_step","infer_launches_per_pass","train_images_per_sec","infer_images_per_sec")}))'
    done
done
