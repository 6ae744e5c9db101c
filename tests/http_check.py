"""The HTTP face of a running `tlb serve --http-addr`: the Open Inference Protocol's REST
binding through Triton's own client (tritonclient.http), compared with the gRPC endpoint
(tritonclient.grpc) and with tlb.v1 Classify/GetAttention; tlb.v1 as JSON under /v1 (the
same answers as gRPC, Server-Sent Events for WatchJob); bad HTTP input.

Usage: python http_check.py HTTP_ADDR GRPC_ADDR JOB_ID DATA_ROOT
  HTTP_ADDR  host:port of the HTTP face (plaintext, no tokens)
  GRPC_ADDR  host:port of the same server's gRPC port
  JOB_ID     a job that succeeded on it (10 classes)
  DATA_ROOT  the server's --datasets-root (holding cifar10-mini)
Prints "ok NAME" / "FAIL NAME", the figures, then "http: N passed, M failed".
"""

import base64
import http.client
import io
import json
import sys
import uuid

import numpy as np
import requests
import tritonclient.grpc as tg
import tritonclient.http as th
from PIL import Image
from tritonclient.utils import InferenceServerException

from tally import check, finish, latency_figures

HTTP, GRPC, JOB, DATA = sys.argv[1:5]
BASE = f"http://{HTTP}"
def http_error(call):
    """The HTTP status and message a tritonclient.http call fails with, or ("200", "")."""
    try:
        call()
        return "200", ""
    except InferenceServerException as e:
        return e.status(), e.message() or ""


def png(image):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def v1(method, path, **kw):
    return requests.request(method, BASE + path, timeout=60, **kw)


rest = th.InferenceServerClient(HTTP)
grpc = tg.InferenceServerClient(GRPC)
rng = np.random.default_rng(11)

# --- The Open Inference Protocol over REST ---
check("REST: server live", rest.is_server_live())
check("REST: server ready", rest.is_server_ready())
check("REST: model ready (job id)", rest.is_model_ready(JOB))
check("REST: model ready (`tlb`)", rest.is_model_ready("tlb"))
check("REST: model ready with version = its epoch", rest.is_model_ready(JOB, "1"))
check("REST: an unknown model is not ready", not rest.is_model_ready(str(uuid.uuid4())))
meta = rest.get_server_metadata()
check("REST: server metadata names tlb", meta["name"] == "tlb" and meta["version"], str(meta))
rm, gm = rest.get_model_metadata(JOB), grpc.get_model_metadata(JOB, as_json=True)
same_meta = [(t["name"], t["datatype"], [int(s) for s in t["shape"]]) for t in gm["inputs"] + gm["outputs"]]
check(
    "REST: model metadata equals gRPC's",
    [(t["name"], t["datatype"], t["shape"]) for t in rm["inputs"] + rm["outputs"]] == same_meta
    and rm["versions"] == gm["versions"],
    f"{rm} vs {gm}",
)

images = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)


def both(binary):
    """probabilities and labels from REST (binary or JSON tensors) and from gRPC."""
    ri = th.InferInput("images", list(images.shape), "UINT8")
    ri.set_data_from_numpy(images, binary_data=binary)
    outs = [th.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "labels")]
    r = rest.infer(JOB, [ri], outputs=outs, request_id="rest-1")
    gi = tg.InferInput("images", list(images.shape), "UINT8")
    gi.set_data_from_numpy(images)
    g = grpc.infer(JOB, [gi])
    return r, g


for binary in (True, False):
    kind = "binary-data" if binary else "JSON"
    r, g = both(binary)
    probs, want = r.as_numpy("probabilities"), g.as_numpy("probabilities")
    check(f"REST {kind} tensors: probabilities [4, 10]", probs is not None and probs.shape == (4, 10))
    check(
        f"REST {kind} tensors: probabilities equal gRPC ModelInfer's",
        probs is not None and np.allclose(probs, want, atol=1e-6),
        f"max diff {np.abs(probs - want).max() if probs is not None else '-'}",
    )
    text = lambda a: [x.decode() if isinstance(x, bytes) else str(x) for x in a]
    labels = r.as_numpy("labels")
    check(f"REST {kind} tensors: labels equal gRPC's", labels is not None and text(labels) == text(g.as_numpy("labels")), f"{labels}")
    check(f"REST {kind} tensors: the request id comes back", r.get_response()["id"] == "rest-1")
    sizes = [o.get("parameters", {}).get("binary_data_size") for o in r.get_response()["outputs"]]
    check(
        f"REST {kind} tensors: outputs come back {kind}",
        all(s for s in sizes) if binary else not any(sizes) and all("data" in o for o in r.get_response()["outputs"]),
        str(r.get_response()["outputs"]),
    )

# Encoded images as BYTES, and attention, compared with tlb.v1 over /v1 JSON.
pngs = [png(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)) for _ in range(2)]
enc = th.InferInput("encoded_images", [2], "BYTES")
enc.set_data_from_numpy(np.array(pngs, dtype=np.object_))
got = rest.infer(JOB, [enc], outputs=[th.InferRequestedOutput("probabilities")]).as_numpy("probabilities")
classify = v1("POST", "/v1/classify", json={
    "model": JOB, "images": [{"encoded": base64.b64encode(p).decode()} for p in pngs], "topK": 10,
}).json()
want = np.zeros((2, 10), dtype=np.float32)
for i, res in enumerate(classify["results"]):
    for p in res["predictions"]:
        want[i, p["classIndex"]] = p["probability"]
check("REST encoded_images: probabilities equal /v1/classify's", got is not None and np.allclose(got, want, atol=1e-6))
one = images[:1]
ai = th.InferInput("images", list(one.shape), "UINT8")
ai.set_data_from_numpy(one)
att = rest.infer(JOB, [ai], outputs=[th.InferRequestedOutput("attention")]).as_numpy("attention")
ga = v1("POST", "/v1/attention", json={
    "model": JOB, "image": {"raw": {"width": 32, "height": 32, "rgb8": base64.b64encode(one[0].tobytes()).decode()}},
}).json()
flat = np.array([w for c in ga["chunks"] for w in c["weights"]], dtype=np.float32)
check(
    "REST attention equals /v1/attention's",
    att is not None and att.shape == (1, ga["numChunks"], ga["numHeads"], ga["numLatents"], ga["chunkSize"])
    and np.allclose(att.reshape(-1), flat, atol=1e-6),
)

# Errors: the gRPC endpoint's, as HTTP statuses and {"error": ...}.
bad = th.InferInput("images", [1, 32, 32, 3], "FP32")
bad.set_data_from_numpy(one.astype(np.float32))
code, msg = http_error(lambda: rest.infer(JOB, [bad]))
check("REST FP32 images: 400 naming the input", code == "400" and "images" in msg and "UINT8" in msg, f"{code} {msg}")
short = th.InferInput("images", [1, 32, 32, 3], "UINT8")
short.set_data_from_numpy(one)
short.set_shape([1, 32, 31, 3])
code, msg = http_error(lambda: rest.infer(JOB, [short]))
check("REST a wrong byte count: 400", code == "400" and "3072 bytes" in msg, f"{code} {msg}")
code, msg = http_error(lambda: rest.infer(str(uuid.uuid4()), [ai]))
check("REST an unknown model: 404", code == "404", f"{code} {msg}")
code, msg = http_error(lambda: rest.get_model_config(JOB))
check("REST a Triton extension: 501, saying so", code == "501" and "not served by tlb" in msg, f"{code} {msg}")
over = requests.post(f"{BASE}/v2/models/{JOB}/infer", timeout=60, json={"inputs": [
    {"name": "images", "shape": [1, 1, 1, 3], "datatype": "UINT8", "data": [1, 2, 300]}]})
check("REST a JSON element over 255: 400 naming it", over.status_code == 400 and "300" in over.json()["error"], over.text)
many = np.zeros((257, 2, 2, 3), dtype=np.uint8)
big = th.InferInput("images", list(many.shape), "UINT8")
big.set_data_from_numpy(many)
code, msg = http_error(lambda: rest.infer(JOB, [big]))
check("REST 257 images: 413 (over the limit of 256)", code == "413" and "256" in msg, f"{code} {msg}")

# --- tlb.v1 as JSON: the same answers as gRPC, through the same handlers ---
job = v1("GET", f"/v1/jobs/{JOB}").json()
check("/v1/jobs/ID: the job, in the proto3 JSON mapping", job["jobId"] == JOB and job["state"] == "JOB_STATE_SUCCEEDED", str(job)[:200])
listed = v1("GET", "/v1/jobs", params={"state": "JOB_STATE_SUCCEEDED", "page_size": 500}).json()
check("/v1/jobs?state=: filters by state", JOB in [j["jobId"] for j in listed["jobs"]]
      and all(j["state"] == "JOB_STATE_SUCCEEDED" for j in listed["jobs"]))
epochs = v1("GET", f"/v1/jobs/{JOB}/epochs").json()["epochs"]
check("/v1/jobs/ID/epochs: every epoch, the last equals latestMetrics",
      len(epochs) == job["epochsCompleted"] and epochs[-1] == job["latestMetrics"], f"{epochs} vs {job['latestMetrics']}")
ckpts = v1("GET", f"/v1/jobs/{JOB}/checkpoints").json()["checkpoints"]
check("/v1/jobs/ID/checkpoints: the best is marked", sum(c["best"] for c in ckpts) == 1
      and [c["checkpointId"] for c in ckpts if c["best"]] == [job["bestCheckpointId"]])
check("/v1/jobs/ID: bestValAccuracy is the best checkpoint's",
      [c["valAccuracy"] for c in ckpts if c["best"]] == [job.get("bestValAccuracy")], str(job.get("bestValAccuracy")))
models = v1("GET", "/v1/models").json()["models"]
check("/v1/models: the job's model, one default", any(m["jobId"] == JOB for m in models) and sum(m["isDefault"] for m in models) == 1)
export = v1("GET", f"/v1/models/{JOB}/export")
check("/v1/models/ID/export: a safetensors file", export.status_code == 200
      and export.headers.get("content-disposition", "").endswith('.safetensors"')
      and int.from_bytes(export.content[:8], "little") < len(export.content), f"{export.status_code} {export.headers}")

# WatchJob as Server-Sent Events: a new job's events to its end.
start = v1("POST", "/v1/jobs", json={"preset": "tiny", "config": {"epochs": 3},
                                     "dataset": {"format": "cifar10", "path": "cifar10-mini"}})
watched = start.json()["jobId"]
kinds, data = [], []
with requests.get(f"{BASE}/v1/jobs/{watched}/events", stream=True, timeout=120) as sse:
    check("SSE: text/event-stream", sse.headers.get("content-type", "").startswith("text/event-stream"), str(sse.headers))
    event = None
    for line in sse.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            kinds.append(event)
            data.append(json.loads(line[6:]))
check("SSE: the current state first", kinds[:1] == ["state"] and data[0]["jobId"] == watched, str(kinds[:3]))
check("SSE: an epoch event per epoch", [d["epoch"] for k, d in zip(kinds, data) if k == "epoch"] == [1, 2, 3], str(kinds))
check("SSE: progress events", "progress" in kinds)
check("SSE: ends with end/OK", kinds[-1] == "end" and data[-1]["status"] == "OK", str(data[-1]))
missing = v1("GET", f"/v1/jobs/{uuid.uuid4()}/events")
check("SSE of an unknown job: 404 before any event", missing.status_code == 404 and missing.json()["status"] == "NOT_FOUND", missing.text)
final = v1("GET", f"/v1/jobs/{watched}").json()
check("SSE: the last state event is the job's final state",
      [d for k, d in zip(kinds, data) if k == "state"][-1]["state"] == final["state"] == "JOB_STATE_SUCCEEDED")

# --- Bad HTTP input: precise statuses, the server serves on ---
def status_and_body(method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(HTTP, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    out = r.status, r.read().decode(errors="replace"), r.getheader("content-type")
    conn.close()
    return out


code, body, _ = status_and_body("POST", "/v1/jobs", "{\"preset\": ", {"content-type": "application/json"})
check("malformed JSON: 400 saying so", code == 400 and "malformed JSON" in body, f"{code} {body}")
code, body, _ = status_and_body("POST", "/v1/jobs", "preset=tiny", {"content-type": "application/x-www-form-urlencoded"})
check("a form body: 415", code == 415 and "application/json" in body, f"{code} {body}")
code, body, _ = status_and_body("POST", f"/v2/models/{JOB}/infer", "x", {"content-type": "text/plain"})
check("REST infer with text/plain: 415", code == 415, f"{code} {body}")
code, body, _ = status_and_body("POST", "/v1/jobs", "[1, 2]", {"content-type": "application/json"})
check("a JSON array body: 400", code == 400 and "JSON object" in body, f"{code} {body}")
code, body, _ = status_and_body("POST", "/v1/jobs", json.dumps({"preset": "tiny", "bogus": 1}), {"content-type": "application/json"})
check("an unknown field: 400 naming it", code == 400 and "bogus" in body, f"{code} {body}")
code, body, _ = status_and_body("GET", "/v1/jobs/not-a-uuid")
check("a bad job id: 400 naming job_id", code == 400 and "job_id" in body, f"{code} {body}")
code, body, _ = status_and_body("GET", f"/v1/jobs/{uuid.uuid4()}")
check("an unknown job: 404", code == 404, f"{code} {body}")
code, body, _ = status_and_body("DELETE", "/v1/jobs")
check("a wrong method: 405", code == 405, f"{code} {body}")
conn = http.client.HTTPConnection(HTTP, timeout=30)
conn.putrequest("POST", "/v1/classify")
conn.putheader("content-type", "application/json")
conn.putheader("content-length", str(200 << 20))
conn.endheaders()
r = conn.getresponse()
check("a body over the limit (by its content-length): 413 at once", r.status == 413, f"{r.status} {r.read()[:200]}")
conn.close()
chunk = b" " * (1 << 20)
def oversized():
    yield b'{"images": ['
    for _ in range(140):
        yield chunk
over = requests.post(f"{BASE}/v1/classify", data=oversized(), headers={"content-type": "application/json"}, timeout=60)
check("a streamed body past the limit: 413", over.status_code == 413, f"{over.status_code} {over.text[:200]}")
for path in ["/../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/app.js/../../../etc/passwd",
             "/v1/jobs/..%2f..%2fetc%2fpasswd", "/v2/models/..%2F..%2Fetc%2Fpasswd/infer", "//etc/passwd"]:
    method = "POST" if path.endswith("/infer") else "GET"
    code, body, _ = status_and_body(method, path, "{}" if method == "POST" else None)
    check(f"path traversal {path}: {code}, nothing read from disk", code in (400, 404) and "root:" not in body, f"{code} {body[:200]}")
code, body, ctype = status_and_body("GET", "/nope")
check("an unknown path: 404 as JSON", code == 404 and ctype == "application/json", f"{code} {body}")
health = requests.get(f"{BASE}/healthz", timeout=10)
check("the server serves on (/healthz)", health.status_code == 200 and health.json()["status"] == "ok")
check("the dashboard is served", requests.get(BASE + "/", timeout=10).text.lower().startswith("<!doctype html"))


# --- Figures: REST infer vs gRPC ModelInfer, same server, interleaved ---
batch = rng.integers(0, 256, size=(64, 32, 32, 3), dtype=np.uint8)
calls = {}
for name, mod, client in (("REST infer", th, rest), ("gRPC ModelInfer", tg, grpc)):
    big, single = mod.InferInput("images", list(batch.shape), "UINT8"), mod.InferInput("images", [1, 32, 32, 3], "UINT8")
    big.set_data_from_numpy(batch)
    single.set_data_from_numpy(batch[:1])
    calls[name] = (lambda c=client, i=big: c.infer(JOB, [i]), lambda c=client, i=single: c.infer(JOB, [i]))
latency_figures(calls)
finish("http")
