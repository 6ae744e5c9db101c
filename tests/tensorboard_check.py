"""TensorBoard's own reader (its event multiplexer) on a tlb data dir: every job is a run;
its epoch scalars equal its metrics.jsonl, its step scalars are there, its hyper-parameters
are its config.json's (HParams plugin data), its attention picture is there each epoch, and
an event file cut mid-record still reads up to its last whole record.

usage: tensorboard_check.py DATA_DIR
Prints one line per check and "tensorboard: N passed, M failed"."""

import json
import math
import os
import shutil
import sys
import tempfile

from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.backend.event_processing import event_multiplexer
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

from tally import check, finish

EPOCH_TAGS = {
    "epoch/train_loss": "train_loss",
    "epoch/train_accuracy": "train_accuracy",
    "epoch/val_loss": "val_loss",
    "epoch/val_accuracy": "val_accuracy",
    "epoch/lr": "lr",
    "epoch/images_per_sec": "images_per_sec",
    "epoch/seconds": "seconds",
    "epoch/epoch": "epoch",
}
STEP_EVERY = 10
ATTENTION_TAG = "attention/validation_image_0"
KEEP_ALL = {ea.SCALARS: 0, ea.IMAGES: 0, ea.TENSORS: 0}

def close(a, b):
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)


def epochs_of(run_dir):
    """metrics.jsonl's epochs, the last line of each epoch winning (a resumed run)."""
    epochs = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            d = json.loads(line)
            if "val_accuracy" in d and "epoch" in d:
                epochs[d["epoch"]] = d
    return [epochs[e] for e in sorted(epochs)]


def check_run(mux, data_dir, run):
    run_dir = os.path.join(data_dir, run)
    acc = mux.GetAccumulator(run)
    tags = acc.Tags()
    epochs = epochs_of(run_dir)
    config = json.load(open(os.path.join(run_dir, "config.json")))
    for tag, field in EPOCH_TAGS.items():
        got = [e.value for e in acc.Scalars(tag)] if tag in tags["scalars"] else []
        want = [e[field] for e in epochs]
        check(f"{run}: {tag} equals metrics.jsonl ({len(want)} epochs)",
              len(got) == len(want) and all(close(g, w) for g, w in zip(got, want)))
    steps = [e.step for e in acc.Scalars("step/loss")] if "step/loss" in tags["scalars"] else []
    check(f"{run}: step/loss every {STEP_EVERY} steps ({len(steps)} points)",
          len(steps) > 0 and all(s % STEP_EVERY == 0 for s in steps) and steps == sorted(set(steps)))
    images = acc.Images(ATTENTION_TAG) if ATTENTION_TAG in tags["images"] else []
    check(f"{run}: an attention picture per epoch ({len(images)})",
          len(images) == len(epochs)
          and all(i.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and i.width == 2 * i.height
                  for i in images))
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    check(f"{run}: hparams hold the config's lr, chunk_size and batch_size",
          close(hp["lr"].number_value, config["lr"])
          and hp["chunk_size"].number_value == config["model"]["chunk_size"]
          and hp["batch_size"].number_value == config["batch_size"])
    if "_hparams_/session_end_info" in content:
        end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"])
        check(f"{run}: its end is recorded as a success",
              end.session_end_info.status == api_pb2.STATUS_SUCCESS)
        final = [e.value for e in acc.Scalars("final/best_val_accuracy")]
        check(f"{run}: final/best_val_accuracy is the best epoch's",
              len(final) == 1 and close(final[0], max(e["val_accuracy"] for e in epochs)))


def check_cut(data_dir, run):
    """An event file cut inside its last record: TensorBoard reads every whole record."""
    run_dir = os.path.join(data_dir, run)
    files = sorted(f for f in os.listdir(run_dir) if "tfevents" in f)
    src = os.path.join(run_dir, files[-1])
    size = os.path.getsize(src)
    whole = ea.EventAccumulator(src, size_guidance=KEEP_ALL).Reload()
    n = len(whole.Scalars("step/loss"))
    with tempfile.TemporaryDirectory() as tmp:
        for cut in (1, 5, 13):
            dst = os.path.join(tmp, f"events.out.tfevents.cut{cut}")
            shutil.copyfile(src, dst)
            os.truncate(dst, size - cut)
            part = ea.EventAccumulator(dst, size_guidance=KEEP_ALL).Reload()
            tags = part.Tags()["scalars"]
            got = len(part.Scalars("step/loss")) if "step/loss" in tags else 0
            check(f"{run}: cut {cut} bytes short, the file still reads ({got} of {n} step points)",
                  n - 1 <= got <= n and "epoch/val_accuracy" in tags)
        # A flipped bit in the last record's data (its checksum then fails): the rest reads.
        dst = os.path.join(tmp, "events.out.tfevents.flipped")
        shutil.copyfile(src, dst)
        with open(dst, "r+b") as f:
            f.seek(size - 5)
            byte = f.read(1)
            f.seek(size - 5)
            f.write(bytes([byte[0] ^ 1]))
        part = ea.EventAccumulator(dst, size_guidance=KEEP_ALL).Reload()
        tags = part.Tags()["scalars"]
        check(f"{run}: a corrupt last record, the file reads up to it",
              "epoch/val_accuracy" in tags and len(part.Scalars("step/loss")) >= n - 1)


def check_server(data_dir, jobs):
    """A TensorBoard server on the data dir lists every job as a run, and its HParams plugin
    the config's hyper-parameters and the jobs as sessions."""
    import socket
    import subprocess
    import time
    import urllib.request

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}"
    tb = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", data_dir, "--host", "127.0.0.1",
         "--port", str(port), "--load_fast", "false", "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        runs = []
        for _ in range(240):
            try:
                runs = json.load(urllib.request.urlopen(f"{url}/data/runs", timeout=5))
                if set(jobs) <= set(runs):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        check(f"a TensorBoard server lists every job as a run ({len(runs)} runs)",
              set(jobs) <= set(runs))

        def post(path, body):
            request = urllib.request.Request(
                f"{url}/data/plugin/hparams/{path}", data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"})
            return json.load(urllib.request.urlopen(request, timeout=30))

        experiment = post("experiment", {"experimentName": ""})
        names = {h["name"] for h in experiment.get("hparamInfos", [])}
        check(f"its HParams plugin lists lr, chunk_size and batch_size ({len(names)} hparams)",
              {"lr", "chunk_size", "batch_size"} <= names)
        groups = post("session_groups", {"experimentName": "", "startIndex": 0, "sliceSize": 100,
                                         "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS",
                                                             "STATUS_FAILURE", "STATUS_RUNNING"]})
        sessions = {s["name"] for g in groups.get("sessionGroups", []) for s in g["sessions"]}
        check(f"... and every job as a session ({len(sessions)})", set(jobs) <= sessions)
    finally:
        tb.terminate()
        tb.wait()


def main():
    data_dir = sys.argv[1]
    mux = event_multiplexer.EventMultiplexer(size_guidance=KEEP_ALL)
    mux.AddRunsFromDirectory(data_dir)
    mux.Reload()
    runs = sorted(mux.Runs())
    jobs = sorted(
        f"jobs/{j}" for j in os.listdir(os.path.join(data_dir, "jobs"))
        if os.path.exists(os.path.join(data_dir, "jobs", j, "metrics.jsonl"))
    )
    check(f"every job with metrics is a run ({len(jobs)} jobs, {len(runs)} runs)",
          len(jobs) > 0 and set(jobs) <= set(runs))
    for run in jobs:
        check_run(mux, data_dir, run)
    check_cut(data_dir, jobs[0])
    check_server(data_dir, jobs)
    finish("tensorboard")


if __name__ == "__main__":
    main()
