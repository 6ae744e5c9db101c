#!/usr/bin/env bash
# The docker/compose.yaml topology, natively: a throwaway PostgreSQL, two `tlb serve` replicas
# (r1, r2) sharing it and one data dir, and nginx with docker/nginx.conf in front of them.
# Through nginx with grpcurl: health, six tiny training jobs that must all succeed and be run
# by both replicas, Classify; each replica directly: it lists every job and classifies with a
# model the other one trained. Then latency of GetJob and Classify, direct to r1 and through
# nginx, and calls through nginx with r2 stopped. Prints "replicas: N passed, M failed".
#   TLB_BIN          the tlb binary (default: target/debug/tlb, built if missing)
#   TLB_SHARED_DATA  folder holding cifar10-mini/ (default ../shared/data); without it a small
#                    synthetic CIFAR-10 set is generated
#   TLB_PY_VENV      Python venv with grpcio for the latency client (default target/py-venv,
#                    created if missing)
#   LATENCY_N        calls per latency figure (default 200)
#   KEEP_WORK=1      keep the temp dir (logs, configs) instead of removing it
# Needs PostgreSQL (Debian package postgresql) and nginx (nginx-light): without them it is
# skipped (exit 0), unless CI is set, where it fails.
set -euo pipefail
cd "$(dirname "$0")/.."
TLB="${TLB_BIN:-target/debug/tlb}"
DATA="${TLB_SHARED_DATA:-$(cd .. && pwd)/shared/data}"
PYVENV="${TLB_PY_VENV:-target/py-venv}"
N="${LATENCY_N:-200}"
JOBS=6

# --- Tools: PostgreSQL and nginx from Debian, grpcurl as tests/grpcurl.sh gets it. ---
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
NGINX=$(command -v nginx || ls /usr/sbin/nginx 2>/dev/null || true)
missing=()
[ -n "$PG_BIN" ] && [ -x "$PG_BIN/initdb" ] || missing+=("postgresql (initdb, pg_ctl)")
[ -n "$NGINX" ] || missing+=(nginx)
if [ ${#missing[@]} -gt 0 ]; then
    if [ -n "${CI:-}" ]; then
        echo "FAIL missing ${missing[*]}: .ci/run installs the Debian packages postgresql and nginx-light"
        echo "replicas: 0 passed, 1 failed"
        exit 1
    fi
    echo "SKIPPED tests/replicas.sh: missing ${missing[*]} (apt-get install postgresql nginx-light)"
    exit 0
fi
[ -x "$TLB" ] || cargo build --quiet
# grpcurl, check and the tally.
source tests/lib.sh
# grpcio for the latency client: one grpcurl process per call costs ~20 ms, far more than the
# hop through nginx that is measured.
if ! "$PYVENV/bin/python" -c 'import grpc' 2>/dev/null; then
    python3 -m venv "$PYVENV"
    "$PYVENV/bin/pip" install --quiet --disable-pip-version-check grpcio
fi

WORK=$(mktemp -d /tmp/tlb-replicas.XXXXXX)
chmod 755 "$WORK" # the postgres user and nginx's workers go through it
PIDS=()
NGINX_PID=""
PG_STARTED=""

as_postgres() { # PostgreSQL refuses to run as root: as root, run its tools as `postgres`
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
stop_pid() { # stop_pid PID: SIGTERM, then SIGKILL after 15 s
    local pid=$1
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 150); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    set +e
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    [ -n "$NGINX_PID" ] && stop_pid "$NGINX_PID"
    [ -n "$PG_STARTED" ] && as_postgres "$PG_BIN/pg_ctl" -D "$WORK/pg/data" -m fast -w stop >/dev/null
    if [ "$rc" -ne 0 ] || [ "$failed" -ne 0 ]; then
        for log in "$WORK"/r1.log "$WORK"/r2.log "$WORK"/nginx/error.log "$WORK"/pg/log; do
            [ -s "$log" ] && { echo "--- last lines of $log"; tail -n 25 "$log"; }
        done
    fi
    if [ -n "${KEEP_WORK:-}" ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

die() { # a step the rest depends on failed
    failed=$((failed + 1))
    echo "FAIL $*"
    echo "replicas: $passed passed, $failed failed"
    exit 1
}
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# --- PostgreSQL: initdb + pg_ctl in the temp dir, 127.0.0.1 only, trust auth. ---
mkdir "$WORK/pg"
[ "$(id -u)" -eq 0 ] && chown postgres: "$WORK/pg"
PG_PORT=$(free_port)
as_postgres "$PG_BIN/initdb" -D "$WORK/pg/data" -A trust -U postgres --no-sync >"$WORK/pg/initdb.log" 2>&1 ||
    { cat "$WORK/pg/initdb.log"; die "initdb"; }
as_postgres "$PG_BIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/log" -w \
    -o "-p $PG_PORT -k $WORK/pg -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null ||
    die "pg_ctl start"
PG_STARTED=1
as_postgres "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres tlb || die "createdb tlb"
DB_URL="postgres://postgres@127.0.0.1:$PG_PORT/tlb"
echo "PostgreSQL on 127.0.0.1:$PG_PORT"

# --- Data: cifar10-mini as tests/grpcurl.sh uses it, or a small synthetic CIFAR-10 set. ---
if [ -d "$DATA/cifar10-mini" ]; then
    DS_ROOT=$DATA
    DS_PATH=cifar10-mini
else
    DS_ROOT=$WORK/datasets
    DS_PATH=synthetic
    # The layout of tests/common's write_synthetic_cifar: class-coloured stripes plus noise.
    python3 - "$DS_ROOT/$DS_PATH" <<'EOF'
import os, random, sys
out = sys.argv[1]
os.makedirs(out)
def write(name, n, seed):
    rng = random.Random(seed)
    buf = bytearray()
    for i in range(n):
        label = i % 10
        buf.append(label)
        for c in range(3):
            base = 180 if (label + c) % 3 == 0 else 60
            for y in range(32):
                for x in range(32):
                    stripe = ((x + y * (label % 3)) // (2 + label // 3)) % 2
                    v = base + (50 if stripe == 0 else -50) + rng.randrange(40) - 20
                    buf.append(max(0, min(255, v)))
    open(os.path.join(out, name), "wb").write(buf)
write("data_batch_1.bin", 500, 1)
write("test_batch.bin", 100, 2)
open(os.path.join(out, "batches.meta.txt"), "w").write(
    "\n".join("airplane automobile bird cat deer dog frog horse ship truck".split()))
EOF
fi
echo "dataset $DS_ROOT/$DS_PATH"

# --- Two replicas on one job store and one data dir, started together. ---
start_replica() { # start_replica NAME
    TLB_THREADS="${TLB_THREADS:-1}" RUST_LOG="${RUST_LOG:-info}" "$TLB" serve \
        --addr 127.0.0.1:0 --database-url "$DB_URL" --data-dir "$WORK/data" \
        --datasets-root "$DS_ROOT" --replica-id "$1" --lease-seconds 3 \
        >"$WORK/$1.stdout" 2>"$WORK/$1.log" &
    PIDS+=($!)
}
wait_listening() { # wait_listening NAME PID : sets ADDR_<NAME>
    local addr=""
    for _ in $(seq 600); do
        addr=$(sed -n 's/^tlb listening on //p' "$WORK/$1.stdout" 2>/dev/null)
        [ -n "$addr" ] && break
        kill -0 "$2" 2>/dev/null || break
        sleep 0.1
    done
    [ -n "$addr" ] || die "replica $1 did not start (no 'tlb listening on' line)"
    printf -v "ADDR_$1" '%s' "$addr"
    echo "replica $1 on $addr"
}
start_replica r1
start_replica r2
wait_listening r1 "${PIDS[0]}"
wait_listening r2 "${PIDS[1]}"
R1=$ADDR_r1
R2=$ADDR_r2

# --- nginx: docker/nginx.conf with the replicas' ports, a free port, logs in the temp dir. ---
mkdir "$WORK/nginx"
LB_PORT=$(free_port)
LB=127.0.0.1:$LB_PORT
python3 - docker/nginx.conf "$WORK/nginx" "$R1" "$R2" "$LB" >"$WORK/nginx/nginx.conf" <<'EOF' ||
import re, sys
src, d, r1, r2, lb = sys.argv[1:]
conf = open(src).read()
temp = "".join(f"\n    {t}_temp_path {d}/{t}_temp;" for t in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
for pattern, repl in [
    (r"^error_log\s+\S+", f"pid {d}/nginx.pid;\nerror_log {d}/error.log"),
    (r"^(\s*)access_log\s+\S+", rf"\1access_log {d}/access.log"),
    (r"^(\s*)server\s+tlb-1:50051\b", rf"\1server {r1}"),
    (r"^(\s*)server\s+tlb-2:50051\b", rf"\1server {r2}"),
    (r"^(\s*)listen\s+50051\b", rf"\1listen {lb}"),
    (r"^http\s*\{", "http {" + temp),
]:
    conf, n = re.subn(pattern, repl, conf, flags=re.M)
    if n != 1:
        sys.exit(f"docker/nginx.conf: expected one line matching {pattern!r}, found {n}")
print(conf)
EOF
    die "generating the nginx config from docker/nginx.conf"
NGINX_ARGS=(-p "$WORK/nginx/" -c "$WORK/nginx/nginx.conf")
"$NGINX" -h 2>&1 | grep -q -- '-e filename' && NGINX_ARGS+=(-e "$WORK/nginx/error.log")
check "nginx -t accepts docker/nginx.conf (replica and listen addresses replaced)" \
    "$NGINX" -t -q "${NGINX_ARGS[@]}"
"$NGINX" "${NGINX_ARGS[@]}" -g 'daemon off;' 2>>"$WORK/nginx/error.log" &
NGINX_PID=$!
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$LB_PORT") 2>/dev/null && break
    kill -0 "$NGINX_PID" 2>/dev/null || break
    sleep 0.1
done
kill -0 "$NGINX_PID" 2>/dev/null || die "nginx did not start"
echo "nginx on $LB"

G=("$GRPCURL" -plaintext -max-time 30)

# --- Through nginx: reflection (a bidi stream), health, six jobs, Classify. ---
services=$("${G[@]}" "$LB" list 2>&1 || true)
check "reflection through nginx lists tlb.v1.TrainingService" grep -qx tlb.v1.TrainingService <<<"$services"
health=""
for _ in $(seq 100); do
    health=$("${G[@]}" "$LB" grpc.health.v1.Health/Check 2>/dev/null | json 'd["status"]') || true
    [ "$health" = SERVING ] && break
    sleep 0.2
done
check "health through nginx: SERVING (got ${health:-nothing})" test "$health" = SERVING

start="{\"preset\":\"tiny\",\"config\":{\"epochs\":1},\"dataset\":{\"format\":\"cifar10\",\"path\":\"$DS_PATH\"}}"
IDS=()
for _ in $(seq "$JOBS"); do
    out=$("${G[@]}" -d "$start" "$LB" tlb.v1.TrainingService/StartTraining 2>&1) || true
    id=$(json 'd.get("jobId") or d["job_id"]' <<<"$out" 2>/dev/null) || true
    [ ${#id} -eq 36 ] && IDS+=("$id") || echo "     StartTraining: $(head -c 300 <<<"$out")"
done
check "StartTraining through nginx returns $JOBS job ids (got ${#IDS[@]})" test ${#IDS[@]} -eq "$JOBS"
[ ${#IDS[@]} -gt 0 ] || die "no job started"

# Each job's "STATE WORKER ATTEMPT DEVICE" from GetJob through nginx, until all have ended.
declare -A INFO
deadline=$((SECONDS + 300))
while :; do
    pending=0
    for id in "${IDS[@]}"; do
        case ${INFO[$id]:-} in JOB_STATE_SUCCEEDED* | JOB_STATE_FAILED* | JOB_STATE_CANCELLED*) continue ;; esac
        INFO[$id]=$("${G[@]}" -d "{\"job_id\":\"$id\"}" "$LB" tlb.v1.TrainingService/GetJob 2>/dev/null |
            json '" ".join([d["state"], d.get("worker") or "-", str(d.get("attempt", 0)), d.get("device") or "-"])') ||
            INFO[$id]="GetJob-failed - - -"
        case ${INFO[$id]} in JOB_STATE_SUCCEEDED* | JOB_STATE_FAILED* | JOB_STATE_CANCELLED*) ;; *) pending=$((pending + 1)) ;; esac
    done
    [ "$pending" -eq 0 ] || [ "$SECONDS" -ge "$deadline" ] && break
    sleep 0.5
done
succeeded=0
WORKERS=()
declare -A BY_WORKER
for id in "${IDS[@]}"; do
    read -r state worker attempt device <<<"${INFO[$id]}"
    echo "     job $id $state worker=$worker attempt=$attempt device=$device"
    [ "$state" = JOB_STATE_SUCCEEDED ] && succeeded=$((succeeded + 1)) && BY_WORKER[$worker]=$id
    WORKERS+=("$worker")
done
check "all $JOBS jobs reach JOB_STATE_SUCCEEDED within 5 min (got $succeeded)" test "$succeeded" -eq "${#IDS[@]}"
workers=$(printf '%s\n' "${WORKERS[@]}" | sort -u | tr '\n' ' ')
check "the jobs' workers include r1 and r2 (got ${workers% })" \
    bash -c "grep -qw r1 <<<'$workers' && grep -qw r2 <<<'$workers'"

for r in r1 r2; do
    addr_var=ADDR_$r
    listed=$("${G[@]}" -d '{"page_size":500}' "${!addr_var}" tlb.v1.TrainingService/ListJobs 2>/dev/null |
        json '" ".join(j.get("jobId") or j["job_id"] for j in d.get("jobs", []))') || listed=""
    n=0
    for id in "${IDS[@]}"; do grep -qw -- "$id" <<<"$listed" && n=$((n + 1)); done
    check "replica $r, asked directly, lists all $JOBS jobs (got $n)" test "$n" -eq "${#IDS[@]}"
done

MODEL=${IDS[0]}
PNG=$(base64 -w0 docs/examples/cat.png)
classify_ok() { # classify_ok ADDR MODEL : top 3 with probabilities in (0, 1], at most 1 in sum
    local out
    out=$("${G[@]}" -d "{\"model\":\"$2\",\"images\":[{\"encoded\":\"$PNG\"}],\"top_k\":3}" "$1" \
        tlb.v1.InferenceService/Classify 2>&1) || { echo "     $out" | head -n 3; return 1; }
    python3 -c '
import json, sys
p = [x.get("probability", 0) for x in json.load(sys.stdin)["results"][0]["predictions"]]
print("     probabilities", [round(x, 4) for x in p])
sys.exit(0 if len(p) == 3 and all(0 < x <= 1 for x in p) and sum(p) <= 1.001 else 1)' <<<"$out"
}
check "Classify through nginx answers the top 3 with probabilities" classify_ok "$LB" "$MODEL"
# The shared data dir: each replica serves a model the other one trained.
for pair in "r1 r2" "r2 r1"; do
    read -r asked trainer <<<"$pair"
    model=${BY_WORKER[$trainer]:-}
    addr_var=ADDR_$asked
    if [ -n "$model" ]; then
        check "replica $asked classifies with a model $trainer trained" classify_ok "${!addr_var}" "$model"
    else
        check "replica $asked classifies with a model $trainer trained (none: $trainer ran no job)" false
    fi
done
check "nginx sent calls to both replicas (access log)" \
    bash -c "grep -q 'upstream=$R1 ' '$WORK/nginx/access.log' && grep -q 'upstream=$R2 ' '$WORK/nginx/access.log'"

# --- Latency: N sequential calls each, direct to r1 and through nginx, interleaved. ---
cat >"$WORK/latency.py" <<'EOF'
# latency.py N MODEL PNG DIRECT_ADDR LB_ADDR: p50/p99 of GetJob and a 1-image Classify.
# Generic calls with hand-encoded requests (no stubs): the bytes are the same either way.
import math, sys, time
import grpc

n, model, png_path, direct, lb = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]

def varint(v):
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)

def field(num, data):  # length-delimited field
    return varint(num << 3 | 2) + varint(len(data)) + data

png = open(png_path, "rb").read()
get_job = field(1, model.encode())  # GetJobRequest.job_id
# ClassifyRequest: model = 1, images = 2 (Image.encoded = 1), top_k = 3
classify = field(1, model.encode()) + field(2, field(1, png)) + varint(3 << 3) + varint(3)
opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
stubs = {}
for name, addr in (("direct", direct), ("nginx", lb)):
    channel = grpc.insecure_channel(addr, options=opts)
    grpc.channel_ready_future(channel).result(timeout=10)
    stubs[name] = channel

def pct(xs, q):  # nearest rank
    return sorted(xs)[max(0, math.ceil(q * len(xs)) - 1)]

for label, method, req in (("GetJob", "/tlb.v1.TrainingService/GetJob", get_job),
                           ("Classify", "/tlb.v1.InferenceService/Classify", classify)):
    calls = {k: ch.unary_unary(method) for k, ch in stubs.items()}
    for _ in range(10):  # warm-up: connections, both replicas' model caches
        for call in calls.values():
            call(req, timeout=60)
    lat = {k: [] for k in calls}
    for _ in range(n):
        for k, call in calls.items():
            t = time.perf_counter()
            call(req, timeout=60)
            lat[k].append((time.perf_counter() - t) * 1000)
    d, g = lat["direct"], lat["nginx"]
    print(f"latency {label} direct p50={pct(d, .5):.2f}ms p99={pct(d, .99):.2f}ms "
          f"via nginx p50={pct(g, .5):.2f}ms p99={pct(g, .99):.2f}ms (n={n})", flush=True)
EOF
check "$N GetJob and $N Classify calls each, direct to r1 and through nginx, all succeed" \
    "$PYVENV/bin/python" "$WORK/latency.py" "$N" "$MODEL" docs/examples/cat.png "$R1" "$LB"

# --- One replica down: nginx moves calls it cannot connect to r2 over to r1. ---
stop_pid "${PIDS[1]}"
ok=0
for _ in $(seq 10); do
    state=$("${G[@]}" -d "{\"job_id\":\"$MODEL\"}" "$LB" tlb.v1.TrainingService/GetJob 2>/dev/null |
        json 'd["state"]') || state=""
    [ "$state" = JOB_STATE_SUCCEEDED ] && ok=$((ok + 1))
done
check "with r2 stopped, 10 GetJob calls through nginx all succeed (got $ok)" test "$ok" -eq 10

echo "replicas: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
