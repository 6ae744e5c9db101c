#!/usr/bin/env bash
# Ops check with plain grpcurl and JSON, no .proto files: reflection, health, a training job
# on cifar10-mini, Classify and GetAttention, the Open Inference Protocol (grpcurl and
# tritonclient, tests/open_inference.py), a search, TensorBoard's reader on the jobs' event
# files (tests/tensorboard_check.py); the HTTP face (tests/http_check.py: REST inference,
# /v1 JSON, bad input; the dashboard in headless Chromium, tests/dashboard_check.py; tokens
# and TLS with curl). Prints "grpcurl: N passed, M failed".
#   TLB_SHARED_DATA  folder holding cifar10-mini/ (default ../shared/data)
#   TLB_BIN          the tlb binary (default: target/debug/tlb, built if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${TLB_SHARED_DATA:-$(cd .. && pwd)/shared/data}"
TLB="${TLB_BIN:-target/debug/tlb}"
[ -x "$TLB" ] || cargo build --quiet
# grpcurl, check and the tally.
source tests/lib.sh
[ -d "$DATA/cifar10-mini" ] || { echo "no $DATA/cifar10-mini (set TLB_SHARED_DATA)"; exit 1; }

WORK=$(mktemp -d)
"$TLB" serve --addr 127.0.0.1:0 --http-addr 127.0.0.1:0 --data-dir "$WORK/data" \
    --datasets-root "$DATA" >"$WORK/stdout" 2>"$WORK/server.log" &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$WORK"' EXIT

json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

for _ in $(seq 100); do
    grep -q "listening on" "$WORK/stdout" 2>/dev/null && break
    sleep 0.1
done
ADDR=$(sed -n 's/^tlb listening on //p' "$WORK/stdout")
HTTP=$(sed -n 's/^tlb http listening on //p' "$WORK/stdout")
[ -n "$ADDR" ] || { cat "$WORK/server.log"; exit 1; }
G=("$GRPCURL" -plaintext -max-time 60)

services=$("${G[@]}" "$ADDR" list)
check "reflection lists tlb.v1.TrainingService" grep -qx tlb.v1.TrainingService <<<"$services"
check "reflection lists tlb.v1.InferenceService" grep -qx tlb.v1.InferenceService <<<"$services"
check "reflection lists tlb.v1.DatasetService" grep -qx tlb.v1.DatasetService <<<"$services"
check "reflection lists grpc.health.v1.Health" grep -qx grpc.health.v1.Health <<<"$services"
check "reflection lists v1 and v1alpha" bash -c "grep -qx grpc.reflection.v1.ServerReflection <<<'$services' && grep -qx grpc.reflection.v1alpha.ServerReflection <<<'$services'"
check "describe Classify" bash -c "${G[*]} $ADDR describe tlb.v1.InferenceService.Classify | grep -q ClassifyRequest"

health=""
for _ in $(seq 100); do
    health=$("${G[@]}" "$ADDR" grpc.health.v1.Health/Check | json 'd["status"]') || true
    [ "$health" = SERVING ] && break
    sleep 0.1
done
check "health: SERVING" test "$health" = SERVING
svc=$("${G[@]}" -d '{"service":"tlb.v1.InferenceService"}' "$ADDR" grpc.health.v1.Health/Check | json 'd["status"]')
check "health of tlb.v1.InferenceService: SERVING" test "$svc" = SERVING

start='{"preset":"tiny","config":{"epochs":1},"dataset":{"format":"cifar10","path":"cifar10-mini"}}'
JOB=$("${G[@]}" -d "$start" "$ADDR" tlb.v1.TrainingService/StartTraining | json 'd["jobId"]')
check "StartTraining returns a job id" test ${#JOB} -eq 36

state=""
for _ in $(seq 600); do
    state=$("${G[@]}" -d "{\"job_id\":\"$JOB\"}" "$ADDR" tlb.v1.TrainingService/GetJob | json 'd["state"]')
    case $state in JOB_STATE_SUCCEEDED | JOB_STATE_FAILED | JOB_STATE_CANCELLED) break ;; esac
    sleep 0.5
done
check "job reaches JOB_STATE_SUCCEEDED (got $state)" test "$state" = JOB_STATE_SUCCEEDED
ckpts=$("${G[@]}" -d "{\"job_id\":\"$JOB\"}" "$ADDR" tlb.v1.TrainingService/ListCheckpoints | json 'len(d["checkpoints"])')
check "ListCheckpoints has the epoch" test "$ckpts" -ge 1

PNG=$(base64 -w0 docs/examples/cat.png)
"${G[@]}" -d "{\"model\":\"$JOB\",\"images\":[{\"encoded\":\"$PNG\"}],\"top_k\":3}" "$ADDR" \
    tlb.v1.InferenceService/Classify >"$WORK/classify.json"
top=$(json 'len(d["results"][0]["predictions"])' <"$WORK/classify.json")
check "Classify returns the top 3" test "$top" -eq 3
psum=$(json 'round(sum(p.get("probability", 0) for p in d["results"][0]["predictions"]), 3) <= 1.0' <"$WORK/classify.json")
check "top-3 probabilities are at most 1 in sum" test "$psum" = True

"${G[@]}" -d "{\"model\":\"$JOB\",\"image\":{\"encoded\":\"$PNG\"},\"render_overlay\":true}" "$ADDR" \
    tlb.v1.InferenceService/GetAttention >"$WORK/attention.json"
json 'd["overlayPng"]' <"$WORK/attention.json" | base64 -d >"$WORK/overlay.png"
check "GetAttention renders a PNG" bash -c "head -c 8 '$WORK/overlay.png' | od -An -tx1 | grep -q '89 50 4e 47 0d 0a 1a 0a'"
grid=$(json 'd["gridHeight"] * d["gridWidth"] == len(d["tokenScores"])' <"$WORK/attention.json")
check "token scores fill the grid" test "$grid" = True

# --- The Open Inference Protocol (KServe v2) on the same port: by reflection, then through
# Triton's own client (tritonclient[grpc], in a venv) against Classify/GetAttention. ---
check "reflection lists inference.GRPCInferenceService" grep -qx inference.GRPCInferenceService <<<"$services"
live=$("${G[@]}" "$ADDR" inference.GRPCInferenceService/ServerLive | json 'd.get("live", False)')
check "ServerLive by grpcurl: true" test "$live" = True
"${G[@]}" -d "{\"name\":\"$JOB\"}" "$ADDR" inference.GRPCInferenceService/ModelMetadata >"$WORK/oip-meta.json"
outs=$(json '",".join(o["name"] for o in d["outputs"])' <"$WORK/oip-meta.json")
check "ModelMetadata by grpcurl lists the outputs" test "$outs" = "probabilities,attention,labels"
# Typed contents (what JSON clients send) instead of raw_input_contents.
typed="{\"model_name\":\"$JOB\",\"id\":\"t1\",\"inputs\":[{\"name\":\"images\",\"datatype\":\"UINT8\",\"shape\":[1,2,2,3],\"contents\":{\"uint_contents\":[0,10,20,30,40,50,60,70,80,90,100,110]}}]}"
"${G[@]}" -d "$typed" "$ADDR" inference.GRPCInferenceService/ModelInfer >"$WORK/oip-infer.json"
typed_ok=$(json 'd["id"] == "t1" and [o["name"] for o in d["outputs"]] == ["probabilities", "labels"] and len(__import__("base64").b64decode(d["rawOutputContents"][0])) == 40' <"$WORK/oip-infer.json")
check "ModelInfer by grpcurl with typed UINT8 contents: 10 FP32 probabilities" test "$typed_ok" = True
big=$("${G[@]}" -d "{\"model_name\":\"$JOB\",\"inputs\":[{\"name\":\"images\",\"datatype\":\"UINT8\",\"shape\":[1,1,1,3],\"contents\":{\"uint_contents\":[1,2,300]}}]}" "$ADDR" inference.GRPCInferenceService/ModelInfer 2>&1 || true)
check "a typed element over 255 is InvalidArgument" grep -q "Code: InvalidArgument" <<<"$big"
PYVENV="${TLB_PY_VENV:-target/py-venv}"
if ! "$PYVENV/bin/python" -c 'import tritonclient.grpc, tritonclient.http, grpc_tools, PIL, numpy, tensorboard, requests, selenium' 2>/dev/null; then
    [ -x "$PYVENV/bin/python" ] || python3 -m venv "$PYVENV"
    "$PYVENV/bin/pip" install --quiet --disable-pip-version-check \
        'tritonclient[grpc,http]' grpcio-tools numpy pillow tensorboard requests selenium
fi
mkdir -p "$WORK/stubs"
"$PYVENV/bin/python" -m grpc_tools.protoc -I proto --python_out="$WORK/stubs" \
    --grpc_python_out="$WORK/stubs" proto/tlb/v1/inference.proto
"$PYVENV/bin/python" tests/open_inference.py "$ADDR" "$JOB" "$WORK/stubs" | tee "$WORK/oip.log"
oip_failed=$(sed -n 's/^open-inference: [0-9]* passed, \([0-9]*\) failed$/\1/p' "$WORK/oip.log")
check "tritonclient checks all pass" test "${oip_failed:-1}" = 0

# --- The HTTP face of the same server: REST inference against gRPC, /v1 JSON, bad input. ---
"$PYVENV/bin/python" tests/http_check.py "$HTTP" "$ADDR" "$JOB" "$DATA" | tee "$WORK/http.log"
http_failed=$(sed -n 's/^http: [0-9]* passed, \([0-9]*\) failed$/\1/p' "$WORK/http.log")
check "HTTP face checks all pass (tests/http_check.py)" test "${http_failed:-1}" = 0
# --- The dashboard in headless Chromium, against a server of its own with tokens;
# screenshots of each view under target/dashboard/. ---
"$PYVENV/bin/python" tests/dashboard_check.py "$TLB" "$DATA" target/dashboard | tee "$WORK/dashboard.log"
dash_failed=$(sed -n 's/^dashboard: [0-9]* passed, \([0-9]*\) failed$/\1/p' "$WORK/dashboard.log")
check "dashboard checks all pass in headless Chromium (tests/dashboard_check.py)" test "${dash_failed:-1}" = 0

code=$("${G[@]}" -d '{"job_id":"nope"}' "$ADDR" tlb.v1.TrainingService/GetJob 2>&1 || true)
check "a bad job id is InvalidArgument" grep -q "Code: InvalidArgument" <<<"$code"

# --- A grid search of two trials: started, watched to its end, its best trial served under
# the search's id; a bad space refused naming its field. ---
check "reflection lists tlb.v1.SearchService" grep -qx tlb.v1.SearchService <<<"$services"
bad=$("${G[@]}" -d '{"preset":"tiny","dataset":{"format":"cifar10","path":"cifar10-mini"},"space":"bogus=[1,2]"}' \
    "$ADDR" tlb.v1.SearchService/StartSearch 2>&1 || true)
check "StartSearch with an unknown field: InvalidArgument naming space.bogus" \
    bash -c "grep -q InvalidArgument <<<'$bad' && grep -q 'space.bogus: not a searchable field' <<<'$bad'"
grid='{"preset":"tiny","config":{"epochs":1},"dataset":{"format":"cifar10","path":"cifar10-mini"},
       "space":"lr=[1e-3, 3e-3]","algorithm":"SEARCH_ALGORITHM_GRID","max_concurrent":2}'
SEARCH=$("${G[@]}" -d "$grid" "$ADDR" tlb.v1.SearchService/StartSearch | json 'd["searchId"]')
check "StartSearch returns a search id" test ${#SEARCH} -eq 36
"${G[@]}" -max-time 300 -d "{\"search_id\":\"$SEARCH\"}" "$ADDR" tlb.v1.SearchService/WatchSearch \
    >"$WORK/watch-search.json"
started=$(grep -c '"TRIAL_STARTED"' "$WORK/watch-search.json" || true)
check "WatchSearch streams both trials' starts (got $started)" test "$started" -eq 2
last_kind=$(grep '"kind"' "$WORK/watch-search.json" | tail -1)
check "WatchSearch ends with SEARCH_ENDED" grep -q SEARCH_ENDED <<<"$last_kind"
"${G[@]}" -d "{\"search_id\":\"$SEARCH\"}" "$ADDR" tlb.v1.SearchService/GetSearch >"$WORK/search.json"
sstate=$(json 'd["state"]' <"$WORK/search.json")
check "the search succeeded (got $sstate)" test "$sstate" = SEARCH_STATE_SUCCEEDED
best=$(json 'd["bestJobId"]' <"$WORK/search.json")
by_search=$("${G[@]}" -d "{\"model\":\"$SEARCH\",\"images\":[{\"encoded\":\"$PNG\"}],\"top_k\":3}" "$ADDR" \
    tlb.v1.InferenceService/Classify | json 'd["results"]')
by_best=$("${G[@]}" -d "{\"model\":\"$best\",\"images\":[{\"encoded\":\"$PNG\"}],\"top_k\":3}" "$ADDR" \
    tlb.v1.InferenceService/Classify | json 'd["results"]')
check "Classify with the search id answers as its best trial" test "$by_search" = "$by_best"

# --- TensorBoard's own reader on the data dir: every job above (the trials too) is a run. ---
"$PYVENV/bin/python" tests/tensorboard_check.py "$WORK/data" | tee "$WORK/tensorboard.log"
tb_failed=$(sed -n 's/^tensorboard: [0-9]* passed, \([0-9]*\) failed$/\1/p' "$WORK/tensorboard.log")
check "TensorBoard reads every job's event files (tests/tensorboard_check.py)" test "${tb_failed:-1}" = 0

# --- Tokens and TLS: a server with --auth-tokens and TLS, another with mutual TLS. ---
tests/make-certs.sh "$WORK/certs" >/dev/null
ADMIN=grpcurl-admin-0123456789 TRAIN=grpcurl-train-0123456789 INFER=grpcurl-infer-0123456789
printf 'admin ops %s\ntrain alice %s\ninfer viewer sha256:%s\n' "$ADMIN" "$TRAIN" \
    "$(printf %s "$INFER" | sha256sum | cut -d' ' -f1)" >"$WORK/tokens"
start_server() { # start_server NAME FLAGS... : sets ADDR_<NAME>
    "$TLB" serve --addr 127.0.0.1:0 --data-dir "$WORK/data-$1" --datasets-root "$DATA" \
        --auth-tokens "$WORK/tokens" "${@:2}" >"$WORK/stdout-$1" 2>"$WORK/server-$1.log" &
    PIDS+=($!)
    for _ in $(seq 100); do
        grep -q "listening on" "$WORK/stdout-$1" 2>/dev/null && break
        sleep 0.1
    done
    printf -v "ADDR_$1" '%s' "$(sed -n 's/^tlb listening on //p' "$WORK/stdout-$1")"
    printf -v "HTTP_$1" '%s' "$(sed -n 's/^tlb http listening on //p' "$WORK/stdout-$1")"
}
PIDS=()
trap 'kill $PID "${PIDS[@]}" 2>/dev/null; wait $PID "${PIDS[@]}" 2>/dev/null; rm -rf "$WORK"' EXIT
C="$WORK/certs"
start_server tls --tls-cert "$C/server.pem" --tls-key "$C/server.key" --http-addr 127.0.0.1:0
start_server mtls --tls-cert "$C/server.pem" --tls-key "$C/server.key" --tls-client-ca "$C/ca.pem" \
    --http-addr 127.0.0.1:0
T=("$GRPCURL" -max-time 30 -cacert "$C/ca.pem")

code_of() { # code_of TOKEN ARGS... : OK, or the gRPC code grpcurl reports
    local token=$1 out
    shift
    local auth=()
    [ -n "$token" ] && auth=(-H "authorization: Bearer $token")
    if out=$("${T[@]}" "${auth[@]}" "$@" 2>&1); then
        echo OK
    else
        sed -n 's/^ *Code: //p; s/.*code = \([A-Za-z]*\) desc.*/\1/p' <<<"$out" | head -1
    fi
}
expect() { # expect WANT NAME TOKEN ARGS...
    local want=$1 name=$2 got
    got=$(code_of "${@:3}")
    check "$name: $want (got ${got:-a transport error})" test "$got" = "$want"
}
token_of() { # token_of WHO : the token a caller of that kind sends (none: no header)
    case $1 in
    none) echo "" ;; wrong) echo not-a-valid-token-000000 ;;
    infer) echo "$INFER" ;; train) echo "$TRAIN" ;; admin) echo "$ADMIN" ;;
    esac
}
A=$ADDR_tls
for who in none wrong infer train admin; do
    tok=$(token_of "$who")
    anon=$([ "$who" = none ] || [ "$who" = wrong ] && echo yes || echo no)
    ok_or_401() { [ "$anon" = yes ] && echo Unauthenticated || echo "$1"; }
    # Health without reflection (which needs a token), as a probe would call it.
    expect OK "[$who] health" "$tok" -import-path tests/proto -proto grpc/health/v1/health.proto \
        "$A" grpc.health.v1.Health/Check
    expect "$(ok_or_401 OK)" "[$who] reflection list" "$tok" "$A" list
    expect "$(ok_or_401 OK)" "[$who] ListJobs" "$tok" "$A" tlb.v1.TrainingService/ListJobs
    expect "$(ok_or_401 OK)" "[$who] ListModels" "$tok" "$A" tlb.v1.InferenceService/ListModels
    # The Open Inference Protocol takes the same tokens (any role may infer).
    expect "$(ok_or_401 OK)" "[$who] ServerReady (open inference)" "$tok" "$A" \
        inference.GRPCInferenceService/ServerReady
    expect "$(ok_or_401 NotFound)" "[$who] ModelInfer of an unknown model" "$tok" \
        -d "{\"model_name\":\"$(cat /proc/sys/kernel/random/uuid)\",\"inputs\":[{\"name\":\"images\",\"datatype\":\"UINT8\",\"shape\":[1,1,1,3],\"contents\":{\"uint_contents\":[1,2,3]}}]}" \
        "$A" inference.GRPCInferenceService/ModelInfer
    writes=$([ "$who" = infer ] && echo PermissionDenied || echo InvalidArgument)
    expect "$(ok_or_401 "$writes")" "[$who] StartTraining" "$tok" -d '{"preset":"nope"}' \
        "$A" tlb.v1.TrainingService/StartTraining
    expect "$(ok_or_401 "$writes")" "[$who] CancelJob" "$tok" -d '{"job_id":"nope"}' \
        "$A" tlb.v1.TrainingService/CancelJob
    expect "$(ok_or_401 "$writes")" "[$who] StartSearch" "$tok" -d '{"preset":"nope"}' \
        "$A" tlb.v1.SearchService/StartSearch
    expect "$(ok_or_401 OK)" "[$who] ListSearches" "$tok" "$A" tlb.v1.SearchService/ListSearches
done
plain=$("$GRPCURL" -plaintext -max-time 10 -import-path tests/proto \
    -proto grpc/health/v1/health.proto "$A" grpc.health.v1.Health/Check 2>&1 || true)
check "a plaintext client is refused by the TLS server" bash -c "! grep -q SERVING <<<'$plain'"
expect OK "mTLS with a client certificate" "$INFER" -cert "$C/client.pem" -key "$C/client.key" \
    "$ADDR_mtls" tlb.v1.TrainingService/ListJobs
nocert=$(code_of "$INFER" "$ADDR_mtls" tlb.v1.TrainingService/ListJobs)
check "mTLS without a client certificate fails (got ${nocert:-a handshake error})" test "$nocert" != OK

# The HTTP face of the same servers: the same tokens, roles and TLS (curl).
hcode() { # hcode TOKEN METHOD URL CURL_ARGS... : the HTTP status (000: no answer)
    local tok=$1 method=$2 url=$3 auth=()
    shift 3
    [ -n "$tok" ] && auth=(-H "authorization: Bearer $tok")
    curl -s -o /dev/null -w '%{http_code}' --max-time 30 --cacert "$C/ca.pem" "${auth[@]}" \
        -X "$method" "$@" "$url" || true
}
hexpect() { # hexpect WANT NAME TOKEN METHOD PATH CURL_ARGS...
    local want=$1 name=$2 got
    got=$(hcode "$3" "$4" "https://$HTTP_tls$5" "${@:6}")
    check "HTTP $name: $want (got $got)" test "$got" = "$want"
}
J=(-H 'content-type: application/json')
for who in none wrong infer train admin; do
    tok=$(token_of "$who")
    anon=$([ "$who" = none ] || [ "$who" = wrong ] && echo yes || echo no)
    or401() { [ "$anon" = yes ] && echo 401 || echo "$1"; }
    hexpect 200 "[$who] /healthz (open)" "$tok" GET /healthz
    hexpect 200 "[$who] the dashboard (open: it holds no data)" "$tok" GET /
    hexpect "$(or401 200)" "[$who] GET /v1/jobs" "$tok" GET /v1/jobs
    hexpect "$(or401 200)" "[$who] GET /v2/health/ready" "$tok" GET /v2/health/ready
    writes=$([ "$who" = infer ] && echo 403 || echo 400)
    hexpect "$(or401 "$writes")" "[$who] POST /v1/jobs" "$tok" POST /v1/jobs "${J[@]}" -d '{"preset":"nope"}'
    hexpect "$(or401 "$writes")" "[$who] POST /v1/jobs/ID/cancel" "$tok" POST /v1/jobs/nope/cancel
    export=$([ "$who" = admin ] && echo 404 || echo 403)
    hexpect "$(or401 "$export")" "[$who] GET /v1/models/ID/export (admin only)" "$tok" GET \
        "/v1/models/$(cat /proc/sys/kernel/random/uuid)/export"
done
who=$(curl -s --cacert "$C/ca.pem" -H "authorization: Bearer $TRAIN" "https://$HTTP_tls/v1/whoami")
check "HTTP whoami names the token's holder and role" grep -q '"name":"alice","role":"train"' <<<"$who"
plain=$(hcode "" GET "http://$HTTP_tls/healthz")
check "HTTP: plaintext to the TLS face gets no answer (got $plain)" test "$plain" != 200
h2=$(curl -s -o /dev/null -w '%{http_version}' --cacert "$C/ca.pem" "https://$HTTP_tls/healthz")
check "HTTP/2 over TLS (ALPN) (got $h2)" test "$h2" = 2
mtls=$(hcode "$INFER" GET "https://$HTTP_mtls/v1/jobs" --cert "$C/client.pem" --key "$C/client.key")
check "HTTP mTLS with a client certificate: 200 (got $mtls)" test "$mtls" = 200
nocert=$(hcode "$INFER" GET "https://$HTTP_mtls/v1/jobs")
check "HTTP mTLS without a client certificate: refused (got $nocert)" test "$nocert" != 200

echo "grpcurl: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
