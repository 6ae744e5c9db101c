"""The Open Inference Protocol endpoint through Triton's own client (tritonclient[grpc]).

Usage: python open_inference.py ADDR JOB_ID STUBS_DIR
  ADDR      host:port of a running `tlb serve` (plaintext)
  JOB_ID    a job that succeeded on it (10 classes)
  STUBS_DIR Python stubs of proto/tlb/v1 (grpc_tools.protoc), to compare with Classify and
            GetAttention
Prints "ok NAME" / "FAIL NAME", the figures, then "open-inference: N passed, M failed".
"""

import io
import sys
import uuid

import grpc
import numpy as np
import tritonclient.grpc as tg
from PIL import Image
from tritonclient.utils import InferenceServerException

from tally import check, finish, latency_figures

ADDR, JOB, STUBS = sys.argv[1:4]
sys.path.insert(0, STUBS)
from tlb.v1 import inference_pb2 as pb  # noqa: E402
from tlb.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

def status_of(call):
    """The gRPC status name and message a call fails with, or ("OK", "")."""
    try:
        call()
        return "OK", ""
    except InferenceServerException as e:
        return str(e.status()).replace("StatusCode.", ""), e.message() or ""


client = tg.InferenceServerClient(ADDR)
channel = grpc.insecure_channel(ADDR, options=[("grpc.max_receive_message_length", 64 << 20)])
tlb = pb_grpc.InferenceServiceStub(channel)
rng = np.random.default_rng(7)


def classify_probs(images):
    """Classify's probabilities, [image][class], for tlb.v1 images."""
    answer = tlb.Classify(pb.ClassifyRequest(model=JOB, images=images, top_k=10))
    out = np.zeros((len(images), 10), dtype=np.float32)
    for i, result in enumerate(answer.results):
        for p in result.predictions:
            out[i, p.class_index] = p.probability
    return out, answer


def raw(image):
    h, w, _ = image.shape
    return pb.Image(raw=pb.RawImage(width=w, height=h, rgb8=image.tobytes()))


def png(image):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


# --- Server and model state ---
check("server live", client.is_server_live())
check("server ready", client.is_server_ready())
check("model ready (job id)", client.is_model_ready(JOB))
check("model ready (`tlb`, the default model)", client.is_model_ready("tlb"))
check("model ready with version = its epoch", client.is_model_ready(JOB, "1"))
check("an unknown model is not ready", not client.is_model_ready(str(uuid.uuid4())))
check("an unknown version is not ready", not client.is_model_ready(JOB, "99"))
meta = client.get_server_metadata()
check("server metadata names tlb", meta.name == "tlb" and meta.version != "", str(meta))
mm = client.get_model_metadata(JOB)
inputs = [(t.name, t.datatype, list(t.shape)) for t in mm.inputs]
outputs = [(t.name, t.datatype, list(t.shape)) for t in mm.outputs]
check(
    "model metadata inputs",
    inputs == [("images", "UINT8", [-1, -1, -1, 3]), ("encoded_images", "BYTES", [-1])],
    str(inputs),
)
check(
    "model metadata outputs",
    [o[:2] for o in outputs] == [("probabilities", "FP32"), ("attention", "FP32"), ("labels", "BYTES")]
    and outputs[0][2] == [-1, 10]
    and len(outputs[1][2]) == 5
    and outputs[2][2] == [-1],
    str(outputs),
)
check("model metadata versions", list(mm.versions) == ["1"], str(mm.versions))

# --- ModelInfer with UINT8 images, compared with Classify ---
images = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
inp = tg.InferInput("images", list(images.shape), "UINT8")
inp.set_data_from_numpy(images)
res = client.infer(JOB, [inp], request_id="req-1")
probs = res.as_numpy("probabilities")
labels = res.as_numpy("labels")
expected, answer = classify_probs([raw(i) for i in images])
check("images: probabilities [4, 10]", probs is not None and probs.shape == (4, 10))
check(
    "images: probabilities equal Classify's",
    probs is not None and np.allclose(probs, expected, atol=1e-6),
    f"max diff {np.abs(probs - expected).max() if probs is not None else '-'}",
)
top1 = [r.predictions[0].label.encode() for r in answer.results]
check("images: labels are Classify's top-1", labels is not None and list(labels) == top1, f"{labels} vs {top1}")
check("the request id comes back", res.get_response().id == "req-1")
check(
    "batch_images says the device batch held the 4 images",
    res.get_response().parameters["batch_images"].int64_param >= 4,
    str(res.get_response().parameters),
)
check("default outputs in order", [o.name for o in res.get_response().outputs] == ["probabilities", "labels"])

# --- ModelInfer with encoded PNGs (other sizes: resized like Classify's) ---
pngs = [png(rng.integers(0, 256, size=(48, 40, 3), dtype=np.uint8)) for _ in range(2)]
enc = tg.InferInput("encoded_images", [2], "BYTES")
enc.set_data_from_numpy(np.array(pngs, dtype=np.object_))
res = client.infer(JOB, [enc], outputs=[tg.InferRequestedOutput("probabilities")])
expected, _ = classify_probs([pb.Image(encoded=p) for p in pngs])
got = res.as_numpy("probabilities")
check(
    "encoded_images: probabilities equal Classify's",
    got is not None and np.allclose(got, expected, atol=1e-6),
    f"{got} vs {expected}",
)
check("only the requested output", [o.name for o in res.get_response().outputs] == ["probabilities"])

# --- Attention, compared with GetAttention ---
one = images[:1]
inp = tg.InferInput("images", list(one.shape), "UINT8")
inp.set_data_from_numpy(one)
res = client.infer(
    JOB,
    [inp],
    outputs=[tg.InferRequestedOutput("attention"), tg.InferRequestedOutput("labels")],
)
att = res.as_numpy("attention")
ga = tlb.GetAttention(pb.GetAttentionRequest(model=JOB, image=raw(one[0])))
want = np.array([w for c in ga.chunks for w in c.weights], dtype=np.float32)
check(
    "attention shape [1, chunks, heads, latents, chunk_size]",
    att is not None and list(att.shape) == [1, ga.num_chunks, ga.num_heads, ga.num_latents, ga.chunk_size],
    f"{None if att is None else att.shape}",
)
check(
    "attention equals GetAttention's",
    att is not None and np.allclose(att.reshape(-1), want, atol=1e-6),
)
check("outputs in the requested order", [o.name for o in res.get_response().outputs] == ["attention", "labels"])

# --- The default model ---
req = tg.InferInput("images", [1, 32, 32, 3], "UINT8")
req.set_data_from_numpy(one)
res = client.infer("tlb", [req])
check("the default model `tlb` answers", res.as_numpy("probabilities").shape == (1, 10))

# --- Errors ---
bad = tg.InferInput("images", [1, 32, 32, 3], "FP32")
bad.set_data_from_numpy(one.astype(np.float32))
code, msg = status_of(lambda: client.infer(JOB, [bad]))
check("FP32 images: INVALID_ARGUMENT naming the input", code == "INVALID_ARGUMENT" and "images" in msg and "UINT8" in msg, f"{code} {msg}")
short = tg.InferInput("images", [1, 32, 32, 3], "UINT8")
short.set_data_from_numpy(one)
short.set_shape([1, 32, 31, 3])
code, msg = status_of(lambda: client.infer(JOB, [short]))
check("a wrong byte count: INVALID_ARGUMENT", code == "INVALID_ARGUMENT" and "3072 bytes" in msg, f"{code} {msg}")
odd = tg.InferInput("pixels", [1, 32, 32, 3], "UINT8")
odd.set_data_from_numpy(one)
code, msg = status_of(lambda: client.infer(JOB, [odd]))
check("an unknown input: INVALID_ARGUMENT", code == "INVALID_ARGUMENT" and "pixels" in msg, f"{code} {msg}")
ok_in = tg.InferInput("images", [1, 32, 32, 3], "UINT8")
ok_in.set_data_from_numpy(one)
code, msg = status_of(lambda: client.infer(JOB, [ok_in], outputs=[tg.InferRequestedOutput("logits")]))
check("an unknown output: INVALID_ARGUMENT", code == "INVALID_ARGUMENT" and "logits" in msg, f"{code} {msg}")
code, msg = status_of(lambda: client.infer(str(uuid.uuid4()), [ok_in]))
check("an unknown model: NOT_FOUND", code == "NOT_FOUND", f"{code} {msg}")
code, msg = status_of(lambda: client.get_model_metadata("not-a-model"))
check("metadata of an unknown model: NOT_FOUND", code == "NOT_FOUND", f"{code} {msg}")
code, msg = status_of(lambda: client.get_model_config(JOB))
check("a Triton extension: UNIMPLEMENTED, saying so", code == "UNIMPLEMENTED" and "not served by tlb" in msg, f"{code} {msg}")
check("the server serves on", client.is_server_ready())


# --- Figures: ModelInfer vs Classify, same server, interleaved ---
batch = rng.integers(0, 256, size=(64, 32, 32, 3), dtype=np.uint8)
big = tg.InferInput("images", list(batch.shape), "UINT8")
big.set_data_from_numpy(batch)
raw64 = [raw(i) for i in batch]
single = tg.InferInput("images", [1, 32, 32, 3], "UINT8")
single.set_data_from_numpy(batch[:1])
raw1 = [raw(batch[0])]
latency_figures({
    "ModelInfer": (lambda: client.infer(JOB, [big]), lambda: client.infer(JOB, [single])),
    "Classify": (
        lambda: tlb.Classify(pb.ClassifyRequest(model=JOB, images=raw64, top_k=1)),
        lambda: tlb.Classify(pb.ClassifyRequest(model=JOB, images=raw1, top_k=1)),
    ),
})
finish("open-inference")
