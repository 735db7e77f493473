"""Load test: many visitors at once against a real app server, every answer checked against the
same request made alone.

    python benchmarks/load_test.py                                  # 20 visitors x 600 s on ./assets
    python benchmarks/load_test.py --sessions 10 --seconds 60
    python benchmarks/load_test.py --url http://127.0.0.1:7860/     # attach to a running server

Each visitor is one `gradio_client.Client` (one browser session: its own gr.State). It loops over
what visitors do: generate a range of 8 seeds and pick a sample (or upload a digit drawn with PIL),
attribute it with every method of the Attribute tab's dropdown, compare two methods, upload an
invalid file (must give a readable error), and now and then start a retrain and cancel it, or,
on a folder retrained offline, open one of its precomputed counterfactuals (`/show_offline`). When
the app has the stateless JSON endpoints (`/attribute_seed`, `/attribute_image`), half of the
attributions go through them.

Correctness: before the load phase one client requests every (query, method) pair alone and
records the full score vector (from the histogram's data); under load every answer must match it
(top-k indices a valid top-k of the reference, scores within a tight tolerance, gallery images
byte-identical, compare texts equal). The server caches attributions per (query, method), so a
server this script starts is restarted after the reference phase, and the queries x methods pool
is larger than that cache and visited in a cycle, so that nearly every request under load
computes (with --url the reference phase warms the cache instead: the check is then weaker).

Prints per request kind: requests, errors, p50/p95/max latency; the server's peak RSS (VmHWM of
the server process and its children, and the peak of their summed RSS sampled twice a second);
growth of Gradio's file cache; every error message seen; and the machine it ran on.
"""
from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # (the drill-down check names methods as the page does)
    sys.path.insert(0, ROOT)
STEPS = 50  # DDIM steps of every generated query: journey-trak follows the DDIM-50 trajectory
RANGE = 8  # seeds per generate request (a visitor's range)
# a card: its index, then (optionally) the class name and "<class word> <label>", a caption, its score
CARD = re.compile(r'<b>#(\d+)</b><br>(.*?)<span class="(?:pos|neg)">([^<]+)</span>')
CARD_LABEL = re.compile(r'(?:^|<br>)[a-z]+ (-?\d+)<br>')
# Scores under load vs alone, relative to the largest |score| of the query. Not 0: the app caches a
# generated sample's attribution per (seed, steps), and the sample's pixels differ in the last bits
# (~1e-6) between a seed generated in a batch of 8 and alone, so which request came first decides
# the last digits (~1e-5 relative). Races give errors of order 1 (see the largest deviation printed).
RTOL = 1e-4
DEVIATION = collections.defaultdict(float)  # query kind -> largest relative deviation seen under load
_DEVIATION_LOCK = threading.Lock()


def _deviation(kind: str, value: float):
    with _DEVIATION_LOCK:
        DEVIATION[kind] = max(DEVIATION[kind], value)


# ---------------------------------------------------------------- machine and server process

def machine_info(server_threads: str | None = None) -> str:
    import gradio
    import torch

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)"
    load = os.getloadavg()
    return (f"machine: {platform.platform()}; CPU {cpu}, {os.cpu_count()} cores; accelerator: {gpu}; "
            f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}\n"
            f"python {platform.python_version()}, torch {torch.__version__}, gradio {gradio.__version__}; "
            f"server torch threads: {server_threads or 'as the server was started'}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_status(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}
    except OSError:
        return {}


def _kib(status: dict, key: str) -> int:
    return int(status.get(key, "0 kB").split()[0])


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def pid_listening(port: int) -> int | None:
    """The pid of the local process listening on TCP `port` (same user), or None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                for line in f.readlines()[1:]:
                    parts = line.split()
                    if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == "0A":
                        inodes.add(parts[9])
        except OSError:
            pass
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in {f"socket:[{i}]" for i in inodes}:
                    return int(pid)
        except OSError:
            continue
    return None


class MemorySampler:
    """Peak summed RSS of a process tree, sampled in a thread, and each process's own peak (VmHWM)."""

    def __init__(self, pid: int | None, every: float = 0.5):
        self.pid, self.every = pid, every
        self.peak_tree_kib, self.hwm_kib = 0, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        if self.pid:
            self._thread.start()
        return self

    def sample(self):
        total = 0
        for p in process_tree(self.pid):
            st = _proc_status(p)
            total += _kib(st, "VmRSS")
            self.hwm_kib[p] = max(self.hwm_kib.get(p, 0), _kib(st, "VmHWM"))
        self.peak_tree_kib = max(self.peak_tree_kib, total)

    def _run(self):
        while not self._stop.wait(self.every):
            self.sample()

    def stop(self):
        if self.pid:
            self._stop.set()
            self._thread.join()
            self.sample()

    def summary(self) -> str:
        if not self.pid:
            return "server peak RSS: unknown (no server pid: pass --port of a local server)"
        main = self.hwm_kib.get(self.pid, 0)
        kids = sum(v for p, v in self.hwm_kib.items() if p != self.pid)
        return (f"server peak RSS: VmHWM {main / 1024:.0f} MiB (pid {self.pid})"
                + (f" + {kids / 1024:.0f} MiB in {len(self.hwm_kib) - 1} child processes" if kids else "")
                + f"; peak of the tree's summed RSS (sampled every {self.every} s): {self.peak_tree_kib / 1024:.0f} MiB")


class Server:
    """`python app.py` in a subprocess on a free port, serving `assets`; Gradio's file cache in its own folder."""

    def __init__(self, assets: str, port: int | None = None, threads: int = 1, code: str = ROOT,
                 log: str | None = None, temp_dir: str | None = None):
        self.assets, self.port, self.threads, self.code = os.path.abspath(assets), port or free_port(), threads, code
        self._log_dir = None if log else tempfile.mkdtemp(prefix="dtrak-server-")
        self.log = log or os.path.join(self._log_dir, "app.log")
        self.temp_dir = temp_dir or tempfile.mkdtemp(prefix="dtrak-gradio-")
        self.url = f"http://127.0.0.1:{self.port}/"
        self.proc = None

    def start(self, timeout: float = 300) -> "Server":
        env = dict(os.environ, DTRAK_ASSETS=self.assets, GRADIO_SERVER_PORT=str(self.port),
                   GRADIO_SERVER_NAME="127.0.0.1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1",
                   GRADIO_TEMP_DIR=self.temp_dir, OMP_NUM_THREADS=str(self.threads),
                   PYTHONPATH=self.code + os.pathsep + os.environ.get("PYTHONPATH", ""))
        # every simulated visitor reaches the server from this machine's one address: the app's upload
        # bound per address (DTRAK_UPLOADS_PER_WINDOW, DTRAK_UPLOAD_MB_PER_WINDOW) would refuse their
        # uploads together, so it is lifted here unless asked for; the upload cache's bound stays
        for key in ("DTRAK_UPLOADS_PER_WINDOW", "DTRAK_UPLOAD_MB_PER_WINDOW"):
            env.setdefault(key, "1000000")
        # each visitor's X-Forwarded-For is its own address, as a Space's one proxy appends it: trusted
        # here as there, so the per-address queue bound counts each visitor, not the machine
        env.setdefault("DTRAK_TRUSTED_PROXIES", "1")
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen([sys.executable, "app.py"], cwd=self.code, env=env, stdout=out,
                                         stderr=subprocess.STDOUT)
        t0 = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                urllib.request.urlopen(self.url, timeout=5)
                self.start_seconds = time.perf_counter() - t0
                return self
            except OSError:
                if time.perf_counter() - t0 > timeout:
                    self.stop()
                    raise RuntimeError(f"app.py did not answer within {timeout:.0f} s:\n{self.log_tail()}")
                time.sleep(0.3)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    def kill(self):
        """SIGKILL, as an out-of-memory kill or a pulled plug would: no cleanup runs."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self):
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def cleanup(self, keep_log: bool = False):
        self.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if self._log_dir and not keep_log:
            shutil.rmtree(self._log_dir, ignore_errors=True)


def tree_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
               if os.path.isfile(os.path.join(d, f)))


def tree_hash(root: str) -> dict[str, str]:
    """{relative path: sha256} of every file under root."""
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            path = os.path.join(d, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


# ---------------------------------------------------------------- inputs: queries drawn with PIL

def digit_png(path: str, digit: int, variant: int) -> str:
    """A white digit on black (variant even) or black on white (odd), at one of a few sizes and offsets."""
    from PIL import Image, ImageDraw, ImageFont

    size = (32, 48, 64)[variant % 3]
    ink, paper = (255, 0) if variant % 2 == 0 else (0, 255)
    img = Image.new("L", (size, size), paper)
    font = ImageFont.load_default(size=int(size * 0.8))
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = draw.textbbox((0, 0), str(digit), font=font, stroke_width=1 + variant % 2)
    dx, dy = (variant * 3) % 5 - 2, (variant * 2) % 5 - 2
    draw.text(((size - (x1 - x0)) / 2 - x0 + dx, (size - (y1 - y0)) / 2 - y0 + dy), str(digit), fill=ink, font=font,
              stroke_width=1 + variant % 2, stroke_fill=ink)
    img.save(path, format="PNG")
    return path


def bad_files(folder: str) -> list[str]:
    """Files a visitor might upload that are not usable images; each must give a readable error."""
    from PIL import Image

    text = os.path.join(folder, "notes.png")
    with open(text, "w") as f:
        f.write("this is not an image\n")
    png = os.path.join(folder, "whole.png")
    Image.new("L", (16, 16), 128).save(png)
    truncated = os.path.join(folder, "truncated.png")
    with open(png, "rb") as f, open(truncated, "wb") as g:
        g.write(f.read()[:40])
    os.remove(png)
    return [text, truncated]


class Query:
    """A generated sample (seed, DDIM-50) or an uploaded file (path, invert)."""

    def __init__(self, seed: int | None = None, path: str | None = None, invert: bool = False):
        self.seed, self.path, self.invert = seed, path, invert

    @property
    def generated(self) -> bool:
        return self.seed is not None

    @property
    def kind(self) -> str:
        return "generated" if self.generated else "uploaded"

    @property
    def name(self) -> str:
        return f"seed {self.seed}" if self.generated else f"{os.path.basename(self.path)}{' (inverted)' * self.invert}"

    def methods(self, methods: list[str]) -> list[str]:
        return methods if self.generated else [m for m in methods if m != "journey-trak"]


def make_queries(folder: str, n_generated: int, n_uploads: int) -> list[Query]:
    # each generated seed in its own range of 8, so selecting it takes its own generate request
    gen = [Query(seed=RANGE * j + (5 * j) % RANGE) for j in range(n_generated)]
    up = []
    for i in range(n_uploads):
        path = digit_png(os.path.join(folder, f"digit{i % 10}-v{i // 10}.png"), i % 10, i)
        up.append(Query(path=path, invert=i % 2 == 1))  # variant odd: dark ink on light paper
    return gen + up


# ---------------------------------------------------------------- results and their checks

class Mismatch(Exception):
    """A result under load that differs from the same request made alone."""


def parse_cards(html: str) -> list[tuple[int, int | None, str]]:
    cards = []
    for i, middle, score in CARD.findall(html or ""):
        label = CARD_LABEL.search(middle)
        cards.append((int(i), None if label is None else int(label.group(1)), score))
    return cards


def plot_scores(plot) -> np.ndarray | None:
    """The histogram's x values (every training image's score), exact (plotly's typed arrays are raw bytes)."""
    if not isinstance(plot, dict) or "plot" not in plot:
        return None
    x = json.loads(plot["plot"])["data"][0]["x"]
    if isinstance(x, dict):
        return np.frombuffer(base64.b64decode(x["bdata"]), dtype=np.dtype(x["dtype"])).astype(np.float64)
    return np.asarray(x, dtype=np.float64)


class Reference:
    """One (query, method) made alone: every score (UI path), or the top entries (JSON path only)."""

    def __init__(self, scores: np.ndarray | None = None, top: dict | None = None, kind: str = "generated",
                 signed: bool | None = None):
        self.scores, self.top, self.kind = scores, top, kind
        # a method whose scores carry no sign lists no opponents: made alone, it listed none
        self.signed = bool(top.get("opponents")) if signed is None and top is not None else signed is not False

    def scale(self) -> float:
        vals = self.scores if self.scores is not None else [s for _, s in self.top["proponents"] + self.top["opponents"]]
        return max(1e-12, float(np.max(np.abs(vals))))

    def tol(self) -> float:
        return RTOL * self.scale()

    def close(self, got, want) -> bool:
        diff = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64)), initial=0))
        _deviation(self.kind, diff / self.scale())
        return diff <= self.tol()

    def check_top(self, indices: list[int], largest: bool, scores: list[float] | None = None):
        """indices must be a valid top-k of the reference (ties within tolerance may come in any order)."""
        tol, k = self.tol(), len(indices)
        if self.scores is not None:
            ref = self.scores if largest else -self.scores
            got = ref[indices]
            kth = np.sort(ref)[::-1][k - 1]
            if len(set(indices)) != k or got.min() < kth - tol or np.any(np.diff(got) > tol):
                raise Mismatch(f"top-{k} {'proponents' if largest else 'opponents'} {indices} are not the "
                               f"reference's (expected {list(np.argsort(-ref, kind='stable')[:k])})")
            if scores is not None and not self.close(scores, self.scores[indices]):
                raise Mismatch(f"scores {scores} differ from the reference's {list(self.scores[indices])}")
            return
        ref = self.top["proponents" if largest else "opponents"]
        if k > len(ref):
            return
        want = [i for i, _ in ref[:k]]
        ref_scores = [s for _, s in ref[:k]]
        if indices != want and not np.allclose(sorted(ref_scores), sorted(scores or ref_scores), atol=tol):
            raise Mismatch(f"top-{k} {indices} differ from the reference's {want}")
        if scores is not None and not self.close(scores, ref_scores):
            raise Mismatch(f"scores {scores} differ from the reference's {ref_scores}")

    def check_scores(self, scores: np.ndarray | None):
        if scores is None or self.scores is None:
            return
        if scores.shape != self.scores.shape:
            raise Mismatch(f"{scores.shape[0]} scores, the reference has {self.scores.shape[0]}")
        if not self.close(scores, self.scores):
            diff = float(np.max(np.abs(scores - self.scores)))
            raise Mismatch(f"scores differ from the reference's by up to {diff:.3g} (tolerance {self.tol():.3g})")


def check_ui(ref: Reference, out: tuple):
    """Outputs of /attribute (proponent and opponent cards, histogram, class mass, summary) vs the reference."""
    props, opps = parse_cards(out[0]), parse_cards(out[1])
    if not props or bool(opps) != ref.signed:
        what = "opponents missing" if ref.signed else "opponents listed for an unsigned method"
        raise Mismatch(f"no proponent cards, or {what}, in the answer: {str(out)[:200]}")
    ref.check_scores(plot_scores(out[2]))
    ref.check_top([i for i, _, _ in props], True)
    if ref.signed:
        ref.check_top([i for i, _, _ in opps], False)


def check_json(ref: Reference, out: dict, k: int):
    for side, largest in (("proponents", True), ("opponents", False)):
        rows = out[side]
        want = k if side == "proponents" or ref.signed else 0  # no opponents for an unsigned method
        if len(rows) != want:
            raise Mismatch(f"{len(rows)} {side}, asked for {k}{'' if want else ' (none: an unsigned method)'}")
        if rows:
            ref.check_top([int(r["index"]) for r in rows], largest, [float(r["score"]) for r in rows])


DRILL_ROW = re.compile(r"<tr><td>([^<]+)</td><td>([\d,]+) of ([\d,]+)</td>")


def check_drill(refs: dict, index: int, page: str):
    """A drill-down's table (the rank of training image `index` under every method) vs the ranks in
    the references made alone ({method label: Reference}); a rank may move only across scores tied
    within the tolerance."""
    rows = {label: int(rank.replace(",", "")) for label, rank, _ in DRILL_ROW.findall(page)}
    if f"Training image #{index}" not in page or not rows:
        raise Mismatch(f"the drill-down of training image {index} shows no ranks")
    for label, ref in refs.items():
        if ref.scores is None or label not in rows:
            continue
        s, tol = ref.scores, ref.tol()
        low, high = int((s > s[index] + tol).sum()) + 1, int((s >= s[index] - tol).sum())
        if not low <= rows[label] <= high:
            raise Mismatch(f"drill-down: training image {index} ranks {rows[label]} under {label}, alone {low}..{high}")


def json_reference(out: dict, kind: str) -> Reference:
    return Reference(top={side: [(int(r["index"]), float(r["score"])) for r in out[side]]
                          for side in ("proponents", "opponents")}, kind=kind)


def compare_text(ref_a: Reference, ref_b: Reference, k: int) -> tuple[str, str] | None:
    """The top-k overlap and rank correlation the compare text must show, from the references' scores."""
    if ref_a.scores is None or ref_b.scores is None:
        return None
    from scipy.stats import spearmanr

    a, b = ref_a.scores, ref_b.scores
    overlap = len(set(np.argsort(-a, kind="stable")[:k]) & set(np.argsort(-b, kind="stable")[:k]))
    return f"{overlap} of {k}", f"{spearmanr(a, b).statistic:.3f}"


def gallery_files(out) -> list[str]:
    """Content-addressed cache paths of a gallery's images (Gradio names a cached image by its bytes' hash)."""
    items = out if isinstance(out, (list, tuple)) else []
    return [os.path.basename(os.path.dirname(it["image"]["path"])) for it in items]


def image_file(out) -> str | None:
    return os.path.basename(os.path.dirname(out["path"])) if isinstance(out, dict) and out.get("path") else None


# ---------------------------------------------------------------- one visitor

class Stats:
    """Thread-safe latencies, errors and mismatches per request kind."""

    def __init__(self):
        self.lock = threading.Lock()
        self.times = collections.defaultdict(list)
        self.errors = collections.Counter()
        self.mismatches = collections.Counter()
        self.messages = collections.Counter()

    def add(self, kind: str, seconds: float, error: str | None = None, mismatch: bool = False):
        with self.lock:
            self.times[kind].append(seconds)
            if error is not None:
                (self.mismatches if mismatch else self.errors)[kind] += 1
                self.messages[f"{kind}: {'MISMATCH ' if mismatch else ''}{error[:300]}"] += 1

    @property
    def total_errors(self) -> int:
        return sum(self.errors.values()) + sum(self.mismatches.values())

    def table(self) -> str:
        rows = [f"{'kind':<33}{'requests':>9}{'errors':>8}{'wrong':>7}{'p50 s':>9}{'p95 s':>9}{'max s':>9}"]
        for kind in sorted(self.times):
            t = np.array(self.times[kind])
            rows.append(f"{kind:<33}{len(t):>9}{self.errors[kind]:>8}{self.mismatches[kind]:>7}"
                        f"{np.percentile(t, 50):>9.2f}{np.percentile(t, 95):>9.2f}{t.max():>9.2f}")
        n = sum(len(t) for t in self.times.values())
        rows.append(f"{'all':<33}{n:>9}{sum(self.errors.values()):>8}{sum(self.mismatches.values()):>7}")
        return "\n".join(rows)

    def error_lines(self) -> str:
        if not self.messages:
            return "errors seen: none"
        return "errors seen (count, kind: message):\n" + "\n".join(
            f"  {n:>5} x {msg}" for msg, n in self.messages.most_common())


class Visitor:
    """One browser session (its own gr.State) talking to the server through gradio_client."""

    def __init__(self, url: str, api: "Api", stats: Stats | None = None, timeout: float = 600,
                 address: str | None = None, think: float = 0.0, rng: random.Random | None = None):
        from gradio_client import Client

        # Visitors come from different addresses (the app bounds queued requests per address, read
        # from the proxy's X-Forwarded-For as on a hosted Space).
        headers = {"X-Forwarded-For": address} if address else None
        self.client = Client(url, verbose=False, download_files=False, headers=headers)
        self.api, self.stats, self.timeout = api, stats, timeout
        # mean seconds a visitor spends reading an answer before the next click (0: a closed loop,
        # every visitor asking again at once: the worst case)
        self.think, self.rng = think, rng or random.Random(0)
        self.current = None  # the Query this session's state holds

    def close(self):
        try:
            self.client.close()
        except Exception:
            pass

    def call(self, api_name: str, *args, event_data=None):
        if event_data is None:
            return self.client.submit(*args, api_name=api_name).result(timeout=self.timeout)
        # A gallery click: the event carries the clicked index (gr.SelectData); gradio_client has no
        # public argument for it, so send it the way the browser does, in the request's event_data.
        fn = self.client._infer_fn_index(api_name, None)
        helper = self.client.new_helper(fn, headers={"x-gradio-user": "api"})
        return self.client.endpoints[fn].make_end_to_end_fn(helper)(*args, event_data=event_data)

    def timed(self, kind: str, fn, *args, expect_error: str | None = None):
        """Run fn(*args), record its latency; a raised error or Mismatch is recorded (and re-raised as None)."""
        t0 = time.perf_counter()
        try:
            out = fn(*args)
        except Mismatch as e:
            self._record(kind, t0, str(e), mismatch=True)
            return None
        except Exception as e:  # an error answer from the server, or a broken connection
            msg = f"{type(e).__name__}: {e}".replace("\n", " ")
            if expect_error is not None and re.search(expect_error, msg):
                self._record(kind, t0)
                return e
            self._record(kind, t0, msg)
            return None
        if expect_error is not None:
            self._record(kind, t0, f"expected an error matching {expect_error!r}, got an answer", mismatch=True)
            return None
        self._record(kind, t0)
        return out

    def _record(self, kind, t0, error=None, mismatch=False):
        if self.stats is not None:
            self.stats.add(kind, time.perf_counter() - t0, error, mismatch)
        if self.think > 0:
            time.sleep(self.rng.expovariate(1 / self.think))

    # -- requests
    def generate(self, start: int) -> list[str]:
        out = self.call("/generate_samples", "range", 0, start, start + RANGE - 1, RANGE, STEPS)
        files = gallery_files(out)
        if len(files) != RANGE:
            raise Mismatch(f"{len(files)} images for a range of {RANGE} seeds")
        return files

    def select(self, q: Query, gallery_ref: list[str] | None = None):
        """Generate q's range of 8 seeds and click q's sample: it becomes this session's query."""
        start = q.seed - q.seed % RANGE
        files = self.generate(start)
        if gallery_ref is not None and files != gallery_ref:
            raise Mismatch(f"generated images of seeds {start}..{start + RANGE - 1} differ from the reference's")
        out = self.call("/select_sample", event_data={"index": q.seed % RANGE, "value": None})
        if int(out[2]) != q.seed:
            raise Mismatch(f"clicking sample {q.seed % RANGE} selected seed {out[2]}, not {q.seed}")
        self.current = q

    def upload(self, q: Query):
        from gradio_client import handle_file

        self.call("/use_upload", handle_file(q.path), q.invert)
        self.current = q

    def attribute_ui(self, method: str, k: int) -> tuple:
        return self.call("/attribute", method, k)

    def attribute_json(self, q: Query, method: str, k: int) -> dict:
        if q.generated:
            return self.call("/attribute_seed", q.seed, STEPS, method, k)
        from gradio_client import handle_file

        return self.call("/attribute_image", handle_file(q.path), q.invert, method, k)

    def retrain(self, seed: int, k: int, ranking: str, cancel_after: float | None = None) -> tuple:
        job = self.client.submit(seed, k, ranking, "none", api_name="/run_counterfactual")
        if cancel_after is not None:
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < cancel_after and not job.done():
                time.sleep(0.1)
            if not job.done():
                self.call("/cancel_retrain")
        return job.result(timeout=self.timeout)


class Api:
    """What the server offers: methods of the Attribute tab, retrain rankings, stateless endpoints."""

    def __init__(self, url: str):
        from gradio_client import Client

        client = Client(url, verbose=False, download_files=False)
        info = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        client.close()
        self.endpoints = set(info)
        self.methods = list(info["/attribute"]["parameters"][0]["type"]["enum"])
        cf = info.get("/run_counterfactual")
        self.rankings = list(cf["parameters"][2]["type"]["enum"]) if cf else []
        self.max_remove = 1
        if cf:
            m = re.search(r"between \d+ and (\d+)", cf["parameters"][1]["type"].get("description", ""))
            self.max_remove = int(m.group(1)) if m else 1
        self.seed_json, self.image_json = "/attribute_seed" in self.endpoints, "/attribute_image" in self.endpoints
        offline = info.get("/show_offline")  # the precomputed counterfactuals of a folder retrained offline
        self.offline_targets = [int(s) for s in offline["parameters"][0]["type"]["enum"]] if offline else []

    def describe(self) -> str:
        return (f"methods ({len(self.methods)}): {', '.join(self.methods)}; retrain rankings: "
                f"{', '.join(self.rankings) or 'none (no live retrain)'}; precomputed counterfactual targets: "
                f"{len(self.offline_targets) or 'none'}; JSON endpoints: "
                f"/attribute_seed {'yes' if self.seed_json else 'no'}, /attribute_image "
                f"{'yes' if self.image_json else 'no'}")

    def json_for(self, q: "Query") -> bool:
        return self.seed_json if q.generated else self.image_json


# ---------------------------------------------------------------- reference phase (one client, alone)

class References:
    def __init__(self):
        self.attr: dict[tuple[str, str], Reference] = {}  # (query name, method) -> Reference
        self.gallery: dict[int, list[str]] = {}  # range start -> image files
        self.retrain: dict[tuple, tuple] = {}  # (seed, k, ranking) -> (after image file, table rows)
        self.offline: dict[int, list] = {}  # precomputed counterfactual target -> [(label, image file)]
        self.seconds = 0.0


def retrain_fingerprint(out: tuple) -> tuple:
    """A finished retrain's after image (content hash) and its table without the wall time column."""
    rows = out[3]["data"] if isinstance(out[3], dict) else out[3]
    return image_file(out[1]), [r[:-1] for r in rows]


def offline_fingerprint(out) -> list[tuple]:
    """A precomputed counterfactual view: each image's label (pixel L2, class read) and content hash."""
    return [(o.get("label"), image_file(o.get("value"))) for o in out]


def record_references(url: str, api: Api, queries: list[Query], gen_starts: list[int], retrains: list[tuple],
                      log=print) -> References:
    refs, t0 = References(), time.perf_counter()
    v = Visitor(url, api)
    try:
        for start in sorted({q.seed - q.seed % RANGE for q in queries if q.generated} | set(gen_starts)):
            refs.gallery[start] = v.generate(start)
        for q in queries:
            ui = True
            try:
                v.select(q) if q.generated else v.upload(q)
            except Exception:
                if not api.json_for(q):
                    raise
                ui = False  # the click event could not be sent: the JSON endpoint gives the reference
            for method in q.methods(api.methods):
                if ui:
                    out = v.attribute_ui(method, 8)
                    refs.attr[q.name, method] = Reference(scores=plot_scores(out[2]), kind=q.kind,
                                                          signed=bool(parse_cards(out[1])))
                else:
                    refs.attr[q.name, method] = json_reference(v.attribute_json(q, method, 32), q.kind)
        for seed, k, ranking in retrains:
            refs.retrain[seed, k, ranking] = retrain_fingerprint(v.retrain(seed, k, ranking))
        for seed in api.offline_targets:
            refs.offline[seed] = offline_fingerprint(v.call("/show_offline", seed))
    finally:
        v.close()
    refs.seconds = time.perf_counter() - t0
    log(f"reference: {len(refs.attr)} (query, method) pairs, {len(refs.gallery)} generate ranges, "
        f"{len(refs.retrain)} retrains and {len(refs.offline)} precomputed counterfactuals, one request at a time, "
        f"in {refs.seconds:.0f} s")
    return refs


# ---------------------------------------------------------------- load phase

class Plan:
    """Shared, cyclic work lists: every visitor takes the next query (with all its methods, shuffled),
    the next generate range; visiting them in a cycle longer than the server's cache defeats it."""

    def __init__(self, queries: list[Query], gen_starts: list[int], seed: int):
        self.lock, self.rng = threading.Lock(), random.Random(seed)
        self.queries, self.gen_starts = queries[:], gen_starts[:]
        self.rng.shuffle(self.queries)
        self.qi = self.gi = 0
        self.retrain_slots = threading.Semaphore(2)
        self.full_retrains: list[tuple] = []

    def next_query(self) -> Query:
        with self.lock:
            q = self.queries[self.qi % len(self.queries)]
            self.qi += 1
            return q

    def next_range(self) -> int:
        with self.lock:
            s = self.gen_starts[self.gi % len(self.gen_starts)]
            self.gi += 1
            return s

    def take_full_retrain(self) -> tuple | None:
        with self.lock:
            return self.full_retrains.pop() if self.full_retrains else None


MIX = dict(generate=0.3, bad_upload=0.15, journey_on_upload=0.3, offline=0.3)  # chance per query, besides attributing it


def visitor_loop(v: Visitor, api: Api, refs: References, plan: Plan, bad: list[str], deadline: float,
                 rng: random.Random, retrain_every: float, mix: dict = MIX):
    """One visitor until the deadline: pick a query, attribute it with every method (k varies),
    compare two of them; between queries sometimes generate, upload a bad file, or retrain + cancel."""
    last_retrain = time.perf_counter() - rng.uniform(0, retrain_every)
    while time.perf_counter() < deadline:
        q = plan.next_query()
        use_json = api.json_for(q) and rng.random() < 0.5
        if not use_json:
            v.current = None
            if q.generated:
                v.timed("select (generate+click)", v.select, q, refs.gallery.get(q.seed - q.seed % RANGE))
            else:
                v.timed("upload", v.upload, q)
            if v.current is not q:
                continue
        methods = q.methods(api.methods)[:]
        rng.shuffle(methods)
        for method in methods:
            if time.perf_counter() >= deadline:
                return
            ref, k = refs.attr.get((q.name, method)), rng.choice((4, 8, 16))
            if use_json:
                def run(method=method, k=k, ref=ref):
                    out = v.attribute_json(q, method, k)
                    if q.generated and out.get("query", {}).get("seed") != q.seed:
                        raise Mismatch(f"asked for seed {q.seed}, the answer is about {out.get('query')}")
                    if ref is not None:
                        check_json(ref, out, k)
                v.timed(f"attribute_json {method}", run)
            else:
                def run(method=method, k=k, ref=ref):
                    out = v.attribute_ui(method, k)
                    if ref is not None:
                        check_ui(ref, out)
                v.timed(f"attribute {method}", run)
        if not use_json and len(methods) >= 2:
            a, b = rng.sample(methods, 2)
            k = rng.choice((4, 8, 16))

            def run_compare(a=a, b=b, k=k):
                out = v.call("/compare", a, b, k)
                ra, rb = refs.attr.get((q.name, a)), refs.attr.get((q.name, b))
                if ra is None or rb is None:
                    return
                ra.check_top([i for i, _, _ in parse_cards(out[0])], True)
                rb.check_top([i for i, _, _ in parse_cards(out[1])], True)
                want = compare_text(ra, rb, k)
                if want and not all(w in out[2] for w in want):
                    raise Mismatch(f"compare text {out[2]!r} does not show overlap {want[0]} and rho {want[1]}")
            v.timed("compare", run_compare)
        if not use_json and methods:  # a card click: the rank of one training image under every method
            ref = refs.attr.get((q.name, rng.choice(methods)))
            if ref is not None and ref.scores is not None:
                index = int(rng.choice(np.argsort(-ref.scores, kind="stable")[:8]))

                def run_drill(index=index, methods=methods):
                    from dtrak_core.app_support import method_label

                    v.call("/preview_training", event_data={"index": index, "value": None})  # the page's two steps
                    out = v.call("/rank_training")
                    outs = [out] if isinstance(out, str) else out  # (states and layout updates are not sent)
                    page = next((o for o in outs if isinstance(o, str) and "<table" in o), "")
                    if not page:
                        raise Mismatch(f"drill-down answer without its table: {str(out)[:400]}")
                    check_drill({method_label(m): refs.attr[q.name, m] for m in methods
                                 if (q.name, m) in refs.attr}, index, page)
                v.timed("drill-down", run_drill)
        if not q.generated and "journey-trak" in api.methods and rng.random() < mix["journey_on_upload"] and not use_json:
            v.timed("journey-trak on upload", v.attribute_ui, "journey-trak", 8, expect_error="generated samples only")
        if rng.random() < mix["generate"]:
            start = plan.next_range()
            ref = refs.gallery.get(start)

            def run_generate(start=start, ref=ref):
                files = v.generate(start)
                if ref is not None and files != ref:
                    raise Mismatch(f"generated images of seeds {start}..{start + RANGE - 1} differ from the reference's")
            v.timed("generate", run_generate)
        if rng.random() < mix["bad_upload"]:
            from gradio_client import handle_file

            path = rng.choice(bad)
            v.timed("bad upload", v.call, "/use_upload", handle_file(path), False,
                    expect_error=rf"Could not use {re.escape(os.path.basename(path))}: ")
            v.current = None
        if api.offline_targets and rng.random() < mix["offline"]:
            seed = rng.choice(api.offline_targets)

            def run_offline(seed=seed):
                got = offline_fingerprint(v.call("/show_offline", seed))
                if seed in refs.offline and got != refs.offline[seed]:
                    raise Mismatch(f"precomputed counterfactual of seed {seed} under load: {got}, alone: "
                                   f"{refs.offline[seed]}")
            v.timed("precomputed counterfactual", run_offline)
        if not api.rankings or time.perf_counter() >= deadline:
            continue
        full = plan.take_full_retrain()
        if full is not None:  # first come: it overlaps the rest of the load
            with plan.retrain_slots:
                def run_full(full=full):
                    got = retrain_fingerprint(v.retrain(*full))
                    if full in refs.retrain and got != refs.retrain[full]:
                        raise Mismatch(f"retrain {full} under load gave {got}, alone {refs.retrain[full]}")
                v.timed("retrain (full)", run_full)
        elif time.perf_counter() - last_retrain > retrain_every and plan.retrain_slots.acquire(blocking=False):
            try:  # at most one running and one queued behind it (the server runs one retrain at a time)
                seed, k = rng.randrange(5000, 10000), rng.randrange(1, max(2, api.max_remove // 3))
                ranking = rng.choice(api.rankings)

                def run_cancel(seed=seed, k=k, ranking=ranking):
                    out = v.retrain(seed, k, ranking, cancel_after=rng.uniform(1, 4))
                    if "Cancelled" not in out[-1] and "removed per ranking" not in out[-1]:
                        raise Mismatch(f"retrain + cancel answered {out[-1]!r}")
                v.timed("retrain + cancel", run_cancel)
            finally:
                plan.retrain_slots.release()
            last_retrain = time.perf_counter()


def run_load(url: str, api: Api, refs: References, queries: list[Query], gen_starts: list[int], bad: list[str],
             sessions: int, seconds: float, seed: int = 0, retrain_every: float = 60.0,
             full_retrains: list[tuple] = (), pid: int | None = None,
             same_address: bool = False, mix: dict = MIX, think: float = 0.0) -> tuple[Stats, MemorySampler, float]:
    """N visitors for `seconds`; returns (stats, memory sampler, wall seconds)."""
    stats, plan = Stats(), Plan(queries, gen_starts, seed)
    plan.full_retrains = list(full_retrains)
    mem = MemorySampler(pid).start()
    visitors = [Visitor(url, api, stats, address=None if same_address else f"10.1.{i // 200}.{i % 200 + 1}",
                        think=think, rng=random.Random(seed * 7919 + i))
                for i in range(sessions)]
    t0 = time.perf_counter()
    deadline = t0 + seconds
    threads = [threading.Thread(target=visitor_loop, daemon=True,
                                args=(v, api, refs, plan, bad, deadline, random.Random(seed * 1000 + i), retrain_every,
                                      mix))
               for i, v in enumerate(visitors)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    mem.stop()
    for v in visitors:
        v.close()
    health_check(url, api, refs, queries, stats)
    return stats, mem, wall


def deviation_line() -> str:
    parts = [f"{kind} {DEVIATION[kind]:.2g}" for kind in sorted(DEVIATION)]
    return (f"largest score deviation from the references, relative to the query's largest |score|: "
            f"{', '.join(parts) or 'none checked'} (tolerance {RTOL:g})")


def health_check(url: str, api: Api, refs: References, queries: list[Query], stats: Stats):
    """After the load, one visitor alone: a gradient method on a generated sample must still give the
    reference's answer (a load that left shared state damaged shows here)."""
    q = next((q for q in queries if q.generated), None)
    method = next((m for m in api.methods if m in ("square", "loss")), None)
    if q is None or method is None or (q.name, method) not in refs.attr:
        return
    v = Visitor(url, api, stats)
    try:
        def run():
            if api.seed_json:
                check_json(refs.attr[q.name, method], v.attribute_json(q, method, 8), 8)
            else:
                v.select(q)
                check_ui(refs.attr[q.name, method], v.attribute_ui(method, 8))
        v.timed(f"alone after the load ({method})", run)
    finally:
        v.close()


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=20, help="visitors at once (default 20)")
    p.add_argument("--seconds", type=float, default=600, help="length of the load phase (default 600)")
    p.add_argument("--assets", default=os.path.join(ROOT, "assets"), help="model folder the started server serves")
    p.add_argument("--url", help="attach to this running server instead of starting one")
    p.add_argument("--port", type=int, help="port of the started server (default: a free one); with --url, "
                                            "found from the URL, to read the server's memory")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the started server (default 1)")
    p.add_argument("--code", default=ROOT, help="folder with the app.py to start (default: this checkout)")
    p.add_argument("--generated", type=int, default=24, help="generated samples in the query pool (default 24)")
    p.add_argument("--uploads", type=int, default=12, help="uploaded digits in the query pool (default 12)")
    p.add_argument("--ranges", type=int, default=80, help="extra generate ranges of 8 seeds (default 80)")
    p.add_argument("--retrain-every", type=float, default=60, help="seconds between a visitor's retrain + cancel")
    p.add_argument("--full-retrain", action="append", default=[], metavar="SEED,K,RANKING",
                   help="also run this retrain to the end under load and compare it with the same retrain alone")
    p.add_argument("--seed", type=int, default=0, help="seed of the visitors' choices")
    p.add_argument("--think", type=float, default=0.0,
                   help="mean seconds a visitor reads an answer before the next click (default 0: closed loop)")
    p.add_argument("--same-address", action="store_true",
                   help="all visitors from one address (default: each its own, as X-Forwarded-For)")
    args = p.parse_args(argv)

    print(machine_info(str(args.threads) if not args.url else None))
    work = tempfile.mkdtemp(prefix="dtrak-load-")
    queries = make_queries(work, args.generated, args.uploads)
    bad = bad_files(work)
    gen_starts = [100_000 + RANGE * i for i in range(args.ranges)]
    full = [(int(s), int(k), r) for s, k, r in (x.split(",") for x in args.full_retrain)]
    server, failed = None, True
    try:
        if args.url:
            url = args.url if args.url.endswith("/") else args.url + "/"
            port = args.port or int(re.search(r":(\d+)", url.split("//", 1)[1]).group(1))
            pid = pid_listening(port)
        else:
            server = Server(args.assets, args.port, args.threads, args.code).start()
            url, pid = server.url, server.pid
            print(f"server: {url} (pid {pid}) on {server.assets}, up in {server.start_seconds:.1f} s; log {server.log}")
        api = Api(url)
        print(api.describe())
        print(f"query pool: {args.generated} generated (DDIM {STEPS}) + {args.uploads} uploaded digits, "
              f"{sum(len(q.methods(api.methods)) for q in queries)} (query, method) pairs; {args.ranges} more "
              f"generate ranges; {len(bad)} invalid files")
        refs = record_references(url, api, queries, gen_starts, full)
        if server is not None:  # a fresh process: its attribution cache must not hold the references
            server.stop()
            cache_before = tree_size(server.temp_dir)
            server = Server(args.assets, server.port, args.threads, args.code, log=server.log,
                            temp_dir=server.temp_dir)
            server._log_dir = os.path.dirname(server.log)
            server.start()
            pid = server.pid
            print(f"server restarted for the load phase (pid {pid}, up in {server.start_seconds:.1f} s)")
        else:
            print("note: attached server: the reference phase warmed its attribution cache, so many load-phase "
                  "attributions are cache hits")
        print(f"load: {args.sessions} sessions for {args.seconds:.0f} s, think time {args.think:g} s ...", flush=True)
        stats, mem, wall = run_load(url, api, refs, queries, gen_starts, bad, args.sessions, args.seconds,
                                    args.seed, args.retrain_every, full, pid, args.same_address, think=args.think)
        print(f"\nload phase: {args.sessions} sessions, {wall:.0f} s wall (asked {args.seconds:.0f} s), "
              f"mean think time {args.think:g} s")
        print(stats.table())
        print(deviation_line())
        print(mem.summary())
        if server is not None:
            print(f"Gradio file cache: {tree_size(server.temp_dir) / 2**20:.1f} MiB after the load phase "
                  f"({cache_before / 2**20:.1f} MiB after the reference phase)")
        print(stats.error_lines())
        print(machine_info(str(args.threads) if not args.url else None).split("\n")[0])
        failed = stats.total_errors > 0
        if server is not None and failed:
            print(f"server log (kept at {server.log}), tail:\n" + server.log_tail(2000))
        return 1 if failed else 0
    finally:
        if server is not None:
            server.cleanup(keep_log=failed)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
