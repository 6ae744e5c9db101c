"""Shared by the Python checks (open_inference.py, http_check.py, dashboard_check.py,
tensorboard_check.py): one "ok NAME" / "FAIL NAME detail" line per check, the closing
"LABEL: N passed, M failed" line the shell scripts read, and interleaved latency figures."""

import statistics
import sys
import time

counts = {"passed": 0, "failed": 0}


def check(name, ok, detail=""):
    """Prints the check's line and counts it; returns `ok`."""
    counts["passed" if ok else "failed"] += 1
    print(("ok   " if ok else "FAIL ") + name + ("" if ok or not detail else f" {detail}"), flush=True)
    return ok


def finish(label):
    """Prints the tally and exits 1 when a check failed."""
    print(f"{label}: {counts['passed']} passed, {counts['failed']} failed")
    sys.exit(1 if counts["failed"] else 0)


def timed(call, n):
    """Seconds each of n calls took."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        out.append(time.perf_counter() - t)
    return out


def latency_figures(calls, batch=64, rounds=10):
    """calls: name -> (a call of `batch` images, a call of one image). Warms each up, runs
    them interleaved (the same server load for each), prints batch images/s (median) and
    one-image p50/p99 latency per name."""
    for many, one in calls.values():
        many()
        one()
    times = {k: ([], []) for k in calls}
    for _ in range(rounds):
        for name, (many, one) in calls.items():
            times[name][0].extend(timed(many, 2))
            times[name][1].extend(timed(one, 20))
    for name, (many, ones) in times.items():
        ones.sort()
        ips = batch / statistics.median(many)
        p50, p99 = ones[len(ones) // 2] * 1e3, ones[int(len(ones) * 0.99)] * 1e3
        print(f"figure {name}: batch {batch} {ips:.0f} images/s; batch 1 p50 {p50:.2f} ms p99 {p99:.2f} ms")
