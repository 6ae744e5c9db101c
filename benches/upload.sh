#!/usr/bin/env bash
# Upload throughput over loopback: `tlb datasets upload` of a ~200 MiB image-folder archive vs
# boto3's put_object of the same bytes to an S3 server (s3s-fs), same machine.
# Needs: cargo build --release --bin tlb --example s3s_fs; boto3 in target/py-venv (tests/grpcurl.sh
# makes the venv; then target/py-venv/bin/pip install boto3).
set -euo pipefail
cd "$(dirname "$0")/.."
TLB=$PWD/target/release/tlb
S3=$PWD/target/release/examples/s3s_fs
PY=$PWD/target/py-venv/bin/python
W=$(mktemp -d)
python3 benches/upload_images.py "$W/imgs" 265 256   # 4 classes x 265 noise PNGs, 256x256: ~200 MiB
du -sb "$W/imgs"
# the archive tlb would make (same packer: tlb datasets upload of a folder); time it apart
( cd "$W" && tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - -C "$W" imgs | gzip -1 > "$W/imgs.tar.gz" )
ls -l "$W/imgs.tar.gz"
"$TLB" serve --addr 127.0.0.1:0 --data-dir "$W/data" --datasets-root "$W/ds" >"$W/out" 2>"$W/err" &
SP=$!
for _ in $(seq 100); do grep -q "listening on" "$W/out" && break; sleep 0.1; done
ADDR=http://$(sed -n 's/^tlb listening on //p' "$W/out")
s=$(date +%s.%N); "$TLB" datasets upload "$W/imgs.tar.gz" --name fig --server "$ADDR" >/dev/null 2>&1; e=$(date +%s.%N)
echo "tlb datasets upload (archive, incl. server-side sha256 + extract + inspect): $(echo "$e - $s" | bc) s"
s=$(date +%s.%N); "$TLB" datasets upload "$W/imgs" --name fig2 --server "$ADDR" >/dev/null 2>&1; e=$(date +%s.%N)
echo "tlb datasets upload (folder: pack + upload + checks): $(echo "$e - $s" | bc) s"
kill $SP
mkdir -p "$W/s3/bench"
"$S3" "$W/s3" ak sk-0123456789012345 9876 >/dev/null 2>&1 &
S3P=$!
sleep 1
"$PY" - "$W/imgs.tar.gz" <<'PY'
import sys, time, boto3
from botocore.config import Config
c = boto3.client("s3", endpoint_url="http://127.0.0.1:9876", aws_access_key_id="ak", aws_secret_access_key="sk-0123456789012345", region_name="us-east-1", config=Config(s3={"addressing_style": "path"}))
data = open(sys.argv[1], "rb").read()
t = time.time(); c.put_object(Bucket="bench", Key="imgs.tar.gz", Body=data); d = time.time() - t
print(f"boto3 put_object to s3s-fs: {d:.2f} s, {len(data)/d/2**20:.0f} MiB/s")
PY
kill $S3P
rm -rf "$W"
