#!/usr/bin/env bash
# Training images/s on `cpu-small` from an s3:// dataset vs the same files on local disk
# (cifar10-mini; 3 epochs each, one after the other, on one server). After the first fetch the
# s3:// dataset is read from the server's disk: the epochs should match.
# Needs: cargo build --release --bin tlb --example s3s_fs; TLB_SHARED_DATA (default ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/lib.sh
DATA="${TLB_SHARED_DATA:-$(cd .. && pwd)/shared/data}"
TLB=$PWD/target/release/tlb
W=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$W"' EXIT
mkdir -p "$W/s3/data"
cp -r "$DATA/cifar10-mini" "$W/s3/data/"
"$PWD/target/release/examples/s3s_fs" "$W/s3" ak sk-0123456789012345 0 >"$W/s3.out" &
for _ in $(seq 50); do grep -q listening "$W/s3.out" && break; sleep 0.1; done
S3=http://$(sed -n 's/^s3 listening on //p' "$W/s3.out")
AWS_ACCESS_KEY_ID=ak AWS_SECRET_ACCESS_KEY=sk-0123456789012345 AWS_DEFAULT_REGION=us-east-1 \
    "$TLB" serve --addr 127.0.0.1:0 --data-dir "$W/data" --datasets-root "$DATA" --s3-endpoint "$S3" \
    >"$W/out" 2>"$W/err" &
for _ in $(seq 100); do grep -q "listening on" "$W/out" && break; sleep 0.1; done
ADDR=$(sed -n 's/^tlb listening on //p' "$W/out")
run() { # $1: the dataset message
    local job state
    job=$("$GRPCURL" -plaintext -d "{\"preset\":\"cpu-small\",\"config\":{\"epochs\":3},\"dataset\":$1}" \
        "$ADDR" tlb.v1.TrainingService/StartTraining | python3 -c 'import json,sys; print(json.load(sys.stdin)["jobId"])')
    while :; do
        state=$("$GRPCURL" -plaintext -d "{\"job_id\":\"$job\"}" "$ADDR" tlb.v1.TrainingService/GetJob \
            | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
        case $state in JOB_STATE_SUCCEEDED) break ;; JOB_STATE_FAILED | JOB_STATE_CANCELLED) echo "$state"; exit 1 ;; esac
        sleep 1
    done
    python3 - "$W/data/jobs/$job/metrics.jsonl" <<'PY'
import json, sys
rates = [json.loads(line).get("images_per_sec") for line in open(sys.argv[1])]
print(" ".join(f"{r:.0f}" for r in rates if r is not None))
PY
}
# Each twice, alternating: the server's first job also warms it up.
for round in 1 2; do
    echo "round $round: local cifar10-mini      images/s per epoch: $(run '{"format":"cifar10","path":"cifar10-mini"}')"
    echo "round $round: s3://data/cifar10-mini/ images/s per epoch: $(run '{"format":"cifar10","uri":"s3://data/cifar10-mini/"}')"
done
