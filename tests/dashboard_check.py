"""The browser dashboard (src/http/dashboard) in headless Chromium against a real `tlb serve`:
sign-in and roles, starting a job from the form and watching its charts grow live, comparing
jobs, the playground (classify, attention overlay, chunk map), role-aware buttons, models.

usage: dashboard_check.py TLB_BIN DATA_ROOT OUT_DIR
Starts its own server (temporary data dir, a token file with admin, train and infer tokens),
saves dashboard-<view>.png screenshots to OUT_DIR, prints one line per check, the figures
(page weight, first contentful paint) and "dashboard: N passed, M failed"; exits 1 on a failure.
Needs selenium and requests, and Debian's chromium + chromedriver."""

import base64
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select

from tally import check, finish

TOKENS = {
    "admin": ("ops", "dash-admin-0123456789"),
    "train": ("alice", "dash-train-0123456789"),
    "infer": ("bob", "dash-infer-0123456789"),
}
DATASET = {"format": "cifar10", "path": "cifar10-mini"}
TERMINAL = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_STOPPED"}
JOB_TIMEOUT = 240
# tiny trains an epoch of cifar10-mini in about 0.25 s at its batch of 64: too fast to watch a
# chart grow. At batch 2 an epoch takes about 2 s (progress events come every 0.5 s).
SLOW_BATCH = 2

def wait_until(fn, timeout, step=0.2):
    """fn()'s first truthy value within `timeout` seconds, else None (exceptions count as no)."""
    end = time.monotonic() + timeout
    while True:
        try:
            value = fn()
            if value:
                return value
        except Exception:  # noqa: BLE001 - an element not there yet, a page mid-navigation
            pass
        if time.monotonic() > end:
            return None
        time.sleep(step)


class Server:
    """`tlb serve` on free ports; `http` is its HTTP base URL once it listens."""

    def __init__(self, binary, data_root, out_dir):
        self.tmp = tempfile.TemporaryDirectory(prefix="tlb-dashboard-")
        tokens = os.path.join(self.tmp.name, "tokens")
        with open(tokens, "w") as f:
            for role, (name, secret) in TOKENS.items():
                f.write(f"{role} {name} {secret}\n")
        os.chmod(tokens, 0o600)
        self.log = open(os.path.join(out_dir, "dashboard-server.log"), "w")
        env = dict(os.environ, TLB_SHARED_DATA=data_root)
        self.proc = subprocess.Popen(
            [binary, "serve", "--addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0",
             "--data-dir", os.path.join(self.tmp.name, "data"), "--datasets-root", data_root,
             "--auth-tokens", tokens],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.http = None
        self.listening = threading.Event()
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self):
        for line in self.proc.stdout:
            if not self.log.closed:
                self.log.write(line)
                self.log.flush()
            m = re.search(r"tlb http listening on (\S+)", line)
            if m:
                self.http = "http://" + m.group(1)
                self.listening.set()
        self.listening.set()

    def wait(self, timeout=180):
        self.listening.wait(timeout)
        return self.http

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.tmp.cleanup()


class Api:
    def __init__(self, base, role):
        self.base = base
        self.headers = {"Authorization": "Bearer " + TOKENS[role][1]}

    def get(self, path):
        r = requests.get(self.base + path, headers=self.headers, timeout=30)
        r.raise_for_status()
        return r.json()

    def post(self, path, body):
        r = requests.post(self.base + path, headers=self.headers, json=body, timeout=60)
        r.raise_for_status()
        return r.json()

    def start_job(self, epochs, **config):
        body = {"preset": "tiny", "config": {"epochs": epochs, **config}, "dataset": DATASET}
        return self.post("/v1/jobs", body)["jobId"]

    def state(self, job_id):
        return self.get(f"/v1/jobs/{job_id}")["state"]

    def wait_job(self, job_id, timeout=JOB_TIMEOUT):
        return wait_until(lambda: (s := self.state(job_id)) in TERMINAL and s, timeout, 0.5)


def browser(download_dir):
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {
        "download.default_directory": download_dir, "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": download_dir})
    return driver


class Page:
    """The dashboard in the browser, with the few moves the checks need."""

    def __init__(self, driver, base, out_dir):
        self.d, self.base, self.out = driver, base, out_dir

    def go(self, hash_route):
        self.d.get(f"{self.base}/#{hash_route}")

    def js(self, script, *args):
        return self.d.execute_script(script, *args)

    def find(self, css):
        return self.d.find_elements(By.CSS_SELECTOR, css)

    def wait_css(self, css, timeout=20):
        return wait_until(lambda: self.find(css), timeout)

    def text(self, css):
        els = self.find(css)
        return els[0].text.strip() if els else None

    def role(self):
        return self.js("return document.getElementById('whoami').dataset.role || ''")

    def sign_in(self, role):
        self.find("#token-forget")[0].click()
        wait_until(lambda: self.role() == "", 10)
        self.find("#token-input")[0].send_keys(TOKENS[role][1])
        self.find("#token-save")[0].click()
        return wait_until(lambda: self.role() == role, 15)

    def points(self, chart):
        return self.js(
            "return [...document.querySelectorAll(arguments[0] + ' .series')]"
            ".reduce((n, e) => n + Number(e.dataset.points || 0), 0)", chart)

    def shot(self, view):
        time.sleep(0.3)  # let the last redraw land
        self.d.save_screenshot(os.path.join(self.out, f"dashboard-{view}.png"))


def check_root(page, base):
    version = requests.get(base + "/healthz", timeout=10).json()["version"]
    page.d.get(base + "/")
    shown = wait_until(lambda: (t := page.text("#version")) not in (None, "", "…") and t, 15)
    check("root loads without a token, shows the /healthz version", shown == version,
          f"shown {shown!r}, healthz {version!r}")


def check_sign_in(page):
    page.go("/jobs")
    prompt = page.wait_css("#auth-prompt", 15)
    check("jobs view without a token prompts for one (401)", bool(prompt),
          f"error banner: {page.text('#error')!r}")
    page.find("#token-input")[0].send_keys(TOKENS["train"][1])
    page.find("#token-save")[0].click()
    ok = wait_until(lambda: page.role() == "train" and TOKENS["train"][0] in page.text("#whoami"), 15)
    check("train token: whoami shows its name and role", bool(ok), f"whoami {page.text('#whoami')!r}")
    stored = page.js("return sessionStorage.getItem('tlb.token')")
    check("the token is kept in sessionStorage", stored == TOKENS["train"][1], f"stored {stored!r}")
    check("train role sees the New job nav", bool(page.find("#nav-new")))


def start_from_form(page):
    page.go("/new")
    page.wait_css("#new-start", 10)
    Select(page.find("#new-preset")[0]).select_by_value("tiny")
    page.find("#new-epochs")[0].send_keys("3")
    page.find("#new-batch-size")[0].send_keys(str(SLOW_BATCH))
    path = page.find("#new-path")[0]
    if path.get_attribute("value") != DATASET["path"]:
        path.clear()
        path.send_keys(DATASET["path"])
    page.shot("new")
    page.find("#new-start")[0].click()
    m = wait_until(lambda: re.match(r"^#/jobs/([^/?]+)$", page.js("return location.hash")), 20)
    return m.group(1) if m else None


def check_live_job(page, api):
    job_id = start_from_form(page)
    if not check("new job form starts a tiny job and opens its view", bool(job_id),
                 f"hash {page.js('return location.hash')!r}, error {page.text('#error')!r}"):
        return None
    first = second = None
    end = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < end and second is None:
        n = page.points("#chart-loss")
        state = api.state(job_id)  # read after the points: they were drawn while it ran
        if state in TERMINAL:
            break
        if state == "JOB_STATE_RUNNING" and n:
            if first is None:
                first = n
            elif n > first:
                second = n
        time.sleep(0.1)
    check("the loss chart gains points while the job trains", second is not None,
          f"points {first} then {second}")
    done = wait_until(lambda: page.text("#job-state") == "succeeded", JOB_TIMEOUT, 0.5)
    check("the job view reaches succeeded", bool(done), f"state {page.text('#job-state')!r}")
    best = page.wait_css("#checkpoints-table tr.best", 15)
    check("the checkpoints table marks a best (★)", bool(best) and "★" in best[0].text)
    page.shot("job")
    return job_id


def check_compare(page, api, job_a, job_b):
    api.wait_job(job_b)
    page.go(f"/compare?ids={job_a},{job_b}")
    series = wait_until(lambda: len(page.find("#chart-compare-accuracy path.series")) == 2
                        and page.points("#chart-compare-accuracy") > 0, 20)
    check("compare: two series in the accuracy chart", bool(series),
          f"{len(page.find('#chart-compare-accuracy path.series'))} series")
    row = page.wait_css('#compare-table tr[data-param="lr"]', 10)
    check("compare: the table lists lr as differing", bool(row))
    page.shot("compare")
    page.go("/jobs")
    page.wait_css("#jobs-table tr[data-job-id]", 10)
    page.shot("jobs")


def test_png():
    """A CIFAR-10 test image from the repository (docs/examples): a PNG a user would drop."""
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "examples", "cat.png"))


DROP_JS = """
const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
const dt = new DataTransfer();
dt.items.add(new File([bytes], 'drop.png', {type: 'image/png'}));
const zone = document.getElementById('drop-zone');
for (const type of ['dragenter', 'dragover', 'drop'])
  zone.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
"""


def check_playground(page, api, model, png):
    with open(png, "rb") as f:
        b64 = base64.b64encode(f.read()).decode()
    expected = api.post("/v1/classify", {"model": model, "images": [{"encoded": b64}], "topK": 5})
    label = expected["results"][0]["predictions"][0]["label"]
    page.go("/playground")
    page.wait_css("#playground-file", 10)
    page.find("#playground-model")[0].send_keys(model)
    page.find("#playground-file")[0].send_keys(png)
    top = wait_until(lambda: page.text("#top-class"), 30)
    check("playground file input: top class equals Classify's", top == label, f"{top!r} vs {label!r}")
    loaded = wait_until(lambda: page.js(
        "const i = document.getElementById('attention-overlay'); return i && i.complete && i.naturalWidth"), 20)
    check("playground: the attention overlay image loaded", bool(loaded))
    canvas = "return document.getElementById('chunk-canvas').toDataURL()"
    before = wait_until(lambda: page.js(canvas), 10)
    page.find("#chunk-slider")[0].send_keys(Keys.RIGHT)
    moved = wait_until(lambda: page.js(canvas) != before, 5)
    slider_max = page.js("return document.getElementById('chunk-slider').max")
    check("playground: moving the chunk slider redraws the chunk map", bool(moved), f"slider max {slider_max}")
    page.js("document.getElementById('top-class').dataset.old = '1'")
    page.js(DROP_JS, b64)
    dropped = wait_until(lambda: page.js(
        "const e = document.getElementById('top-class'); return e && !e.dataset.old && e.textContent"), 30)
    check("playground drop: top class equals Classify's", dropped == label, f"{dropped!r} vs {label!r}")
    page.shot("playground")


FORGED_CANCEL = """
const [id, token, done] = arguments;
fetch('/v1/jobs/' + id + '/cancel', {method: 'POST', headers: {Authorization: 'Bearer ' + token}})
  .then((r) => done(r.status), (e) => done(String(e)));
"""


def check_infer(page, api_admin, long_job):
    signed = page.sign_in("infer")
    check("infer token: whoami shows role infer", bool(signed), f"whoami {page.text('#whoami')!r}")
    page.go("/jobs")
    row = page.wait_css(f'#jobs-table tr[data-job-id="{long_job}"]', 15)
    state = api_admin.state(long_job)
    check("infer: a queued/running job shows no Cancel button",
          bool(row) and state not in TERMINAL and not page.find("#jobs-table button.cancel"),
          f"row {bool(row)}, state {state}, cancel buttons {len(page.find('#jobs-table button.cancel'))}")
    status = page.d.execute_async_script(FORGED_CANCEL, long_job, TOKENS["infer"][1])
    job = api_admin.get(f"/v1/jobs/{long_job}")
    check("infer: a forged cancel from the page gets 403 and changes nothing",
          status == 403 and not job.get("cancelRequested") and job["state"] not in TERMINAL,
          f"status {status}, job {job['state']} cancelRequested={job.get('cancelRequested')}")
    check("infer: no New job nav", not page.find("#nav-new"))


def check_admin(page, api_admin, long_job, finished_job, download_dir):
    check("admin token: whoami shows role admin", bool(page.sign_in("admin")))
    page.go("/jobs")
    row = page.wait_css(f'#jobs-table tr[data-job-id="{long_job}"] button.cancel', 15)
    check("admin: the running job has a Cancel button", bool(row))
    # by job: a running job's model (its best checkpoint so far) changes id as it trains
    def model_jobs():
        return {m["jobId"] for m in api_admin.get("/v1/models").get("models", [])}

    def shown_jobs():
        return {r.get_attribute("data-job") for r in page.find("#models-table tr[data-model-id]")}

    before = model_jobs()
    page.go("/models")
    shown = wait_until(lambda: before and before <= shown_jobs() and shown_jobs(), 15)
    after = model_jobs()  # the long job may add one meanwhile
    check("admin: the models view lists every model", bool(shown) and shown <= after,
          f"shown {sorted(shown or [])}, listed {sorted(after)}")
    buttons = page.find("#models-table button.export")
    check("admin: every model has an Export button", len(buttons) == len(shown or ()) > 0,
          f"{len(buttons)} buttons")
    mine = page.find(f'#models-table tr[data-job="{finished_job}"] button.export')
    if mine:
        mine[0].click()
        saved = wait_until(lambda: [f for f in os.listdir(download_dir)
                                    if f.endswith(".safetensors") and os.path.getsize(os.path.join(download_dir, f))], 30)
        check("admin: Export downloads a .safetensors file", bool(saved), f"error {page.text('#error')!r}")
    else:
        check("admin: Export downloads a .safetensors file", False, f"no Export button for job {finished_job}")
    page.shot("models")


def figures(page, base):
    weight = sum(len(requests.get(base + p, timeout=10).content) for p in ("/", "/app.js", "/app.css"))
    print(f"figure page weight: {weight} bytes")
    paints = []
    for _ in range(5):
        page.d.get("about:blank")
        page.d.get(base + "/")
        fcp = wait_until(lambda: page.js(
            "const e = performance.getEntriesByType('paint').find((p) => p.name === 'first-contentful-paint');"
            "return e ? e.startTime : 0"), 10, 0.05)
        if fcp:
            paints.append(fcp)
    fcp = f"{statistics.median(paints):.1f}" if paints else "n/a"
    print(f"figure first contentful paint: {fcp} ms")


def run(binary, data_root, out_dir):
    server = Server(binary, data_root, out_dir)
    driver = long_job = api_admin = None
    try:
        base = server.wait()
        if not check("server prints its HTTP address", bool(base), f"exit code {server.proc.poll()}"):
            return
        downloads = tempfile.mkdtemp(prefix="tlb-dashboard-dl-")
        driver = browser(downloads)
        page = Page(driver, base, out_dir)
        api_admin, api_train = Api(base, "admin"), Api(base, "train")
        check_root(page, base)
        check_sign_in(page)
        job_a = check_live_job(page, api_train)
        job_b = api_train.start_job(2, lr=0.001)
        if job_a:
            check_compare(page, api_train, job_a, job_b)
            check_playground(page, api_train, job_a, test_png())
        long_job = api_admin.start_job(50, batchSize=SLOW_BATCH)
        check_infer(page, api_admin, long_job)
        check_admin(page, api_admin, long_job, job_b, downloads)
        figures(page, base)
    except Exception as err:  # noqa: BLE001 - a broken step is a failure, not a crash
        check("the checks ran to the end", False, f"{type(err).__name__}: {err}")
    finally:
        if long_job and api_admin:
            try:
                api_admin.post(f"/v1/jobs/{long_job}/cancel", {})
            except Exception:  # noqa: BLE001
                pass
        if driver:
            driver.quit()
        server.stop()


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    binary, data_root, out_dir = sys.argv[1:]
    os.makedirs(out_dir, exist_ok=True)
    run(os.path.abspath(binary), os.path.abspath(data_root), os.path.abspath(out_dir))
    finish("dashboard")


if __name__ == "__main__":
    main()
