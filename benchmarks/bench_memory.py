"""Benchmark 5: peak memory (RSS) of featurizing the default store, and of the app at rest.

Each measurement runs in a fresh Python process so that peaks do not mix:

- featurize: `Featurizer` + `FeatureStore.fill` for the default setting (D-TRAK 'square', K=100,
  sparse JL, k=2048) of the default model, into a temporary store. The peak is reached within the
  first 256-row slice (activations of 32 samples x 100 timesteps, the slice's 256 x d gradients,
  the projection), so --n 512 (two slices) measures the same peak as the full 1,500 in a third of
  the time; the full store is --n 1500.
- app: `python app.py` started on a free port; RSS once it answers HTTP and after one attribution
  through its shared Attributor (via gradio_client when installed, otherwise not measured).
- attributor: `Attributor.load` + one attribution (the app's core without the UI).

    python benchmarks/bench_memory.py --n 512 --threads 1
    python benchmarks/bench_memory.py --what featurize --n 256 --timestep-chunk 100 25 --threads 1
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

from common import ROOT, machine_line, set_threads

FEATURIZE = r"""
import sys, tempfile, time, resource
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})
from dtrak_core.build import DEFAULT_SETTINGS
from dtrak_core.model.data import load_digits
from dtrak_core.attribution.features import Featurizer
from dtrak_core.model.unet import load_checkpoint, checkpoint_hash
from dtrak_core.attribution.store import FeatureStore
unet, scheduler = load_checkpoint({model!r})
train = load_digits("train")
images = train.images[:{n}]
setting = DEFAULT_SETTINGS[0]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
with tempfile.TemporaryDirectory() as tmp:
    store = FeatureStore.create(tmp + "/s", FeatureStore.identity(setting, checkpoint_hash(unet), "bench"), len(images), setting.k)
    t = time.perf_counter()
    store.fill(Featurizer(unet, scheduler, setting, batch_size={batch}, timestep_chunk={chunk}), images, show_bar=False)
    seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"featurize {{setting.slug}} of {n} images (batch {batch}, timestep_chunk {chunk}): {{seconds:.0f}} s ({n} / {{seconds:.0f}} = {{{n} / seconds:.2f}} samples/s); "
      f"peak RSS {{peak:.0f}} MiB (after imports + model load: {{base:.0f}} MiB)")
"""

ATTRIBUTOR = r"""
import sys, resource
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})
from dtrak_core.attribution.attributor import Attributor
from dtrak_core.model.data import load_digits
a = Attributor.load({assets!r})
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
a.attribute(load_digits("validation").images[0], "d-trak")
rss = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"Attributor.load + one d-trak attribution: RSS {{rss:.0f}} MiB at rest after it, peak {{peak:.0f}} MiB "
      f"(peak after load only: {{loaded:.0f}} MiB)")
"""


def proc_rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MiB, from /proc."""
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_app(args) -> None:
    app = os.path.join(ROOT, "app.py")
    if not os.path.isfile(app):
        print("app: app.py does not exist yet; see the Attributor line instead")
        return
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False",
           "OMP_NUM_THREADS": str(args.threads or 2)}
    proc = subprocess.Popen([sys.executable, app], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        import urllib.request

        start = time.perf_counter()
        while True:
            if proc.poll() is not None:
                print(f"app: exited with {proc.returncode}: {proc.stderr.read().decode()[-500:]}")
                return
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                if time.perf_counter() - start > args.app_timeout:
                    print("app: did not answer within the timeout")
                    return
                time.sleep(1)
        time.sleep(3)
        rss, peak = proc_rss_mb(proc.pid)
        print(f"app at rest (answering HTTP after {time.perf_counter() - start:.0f} s, nothing requested yet): "
              f"RSS {rss:.0f} MiB, peak {peak:.0f} MiB")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(code: str) -> None:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    print(out.stdout.strip() or f"failed: {out.stderr[-800:]}")


def main(args):
    set_threads(args.threads)
    print(machine_line())
    threads = args.threads or 2
    model, assets = os.path.join(ROOT, "assets", "model"), os.path.join(ROOT, "assets")
    if "featurize" in args.what:
        for chunk in args.timestep_chunk:
            run(FEATURIZE.format(root=ROOT, threads=threads, model=model, n=args.n, batch=args.batch, chunk=chunk))
    if "attributor" in args.what:
        run(ATTRIBUTOR.format(root=ROOT, threads=threads, assets=assets))
    if "app" in args.what:
        measure_app(args)
    print(machine_line().replace("machine:", "machine at end:"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=512, help="training images to featurize (1500 = the full store)")
    parser.add_argument("--batch", type=int, default=32, help="Featurizer batch_size (its default: 32)")
    parser.add_argument("--timestep-chunk", type=int, nargs="+", default=[100],
                        help="Featurizer timestep_chunk values to compare (its default: 100)")
    parser.add_argument("--what", nargs="+", default=["featurize", "attributor", "app"])
    parser.add_argument("--app-timeout", type=float, default=180)
    parser.add_argument("--threads", type=int, default=None)
    main(parser.parse_args())
