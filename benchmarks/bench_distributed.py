"""Featurizing one store with 2 processes (torchrun, gloo, 1 thread each) against 1 process (1 thread).

Both runs featurize the same setting of the default model (assets/model: checkpoint and manifest
copied into two fresh model folders under runs/, git ignored, no stores), one after the other,
then the two stores are compared bit for bit. Prints both wall times (process start included:
that is what a user waits for), the store fill alone (the manifest's featurize_seconds) and the
speed-ups. On a 2-core machine shared with other jobs the
speed-up is bounded by the cores the other jobs leave free: read it with the load average printed.

    python benchmarks/bench_distributed.py --K 10
"""
from __future__ import annotations

from common import ROOT, Timer, machine_line  # first: before torch

# isort: split
import argparse
import json
import os
import shutil
import subprocess
import sys

from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.attribution.store import FEATURES, FeatureStore


def model_folder(path: str) -> None:
    """A copy of the default model folder with its checkpoint and no stores."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    shutil.copytree(os.path.join(ROOT, "assets", "model"), os.path.join(path, "model"))
    with open(os.path.join(ROOT, "assets", "manifest.json")) as f:
        manifest = json.load(f)
    keep = ("checkpoint", "checkpoint_hash", "dataset", "parameters", "train_config", "train_seconds", "torch")
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump({**{k: manifest[k] for k in keep if k in manifest}, "stores": []}, f, indent=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--K", type=int, default=10)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--output-fn", default="square")
    ap.add_argument("--dir", default=os.path.join(ROOT, "runs", "bench_distributed"))
    args = ap.parse_args()
    print(machine_line())
    print("device: cpu (gloo)")
    featurize = ["-m", "dtrak_core", "featurize", "--output-fn", args.output_fn, "--K", str(args.K), "--k", str(args.k)]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    runs = {"1 process": [], "2 processes (torchrun)": ["-m", "torch.distributed.run", "--standalone", "--nnodes",
                                                       "1", "--nproc_per_node", "2"]}
    times, stores = {}, {}
    for i, (name, launcher) in enumerate(runs.items()):
        root = os.path.join(args.dir, f"run{i}")
        model_folder(root)
        cmd = [sys.executable, *launcher, *featurize, "--root", root]
        with Timer() as t:
            res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"{name} failed:\n{res.stdout}\n{res.stderr[-3000:]}")
        for line in (res.stdout + res.stderr).splitlines():
            if line.startswith("rank "):
                print(f"  {line}")
        setting = FeatureSetting(args.output_fn, K=args.K, k=args.k)
        with open(os.path.join(root, "manifest.json")) as f:
            fill_s = json.load(f)["featurize_seconds"][os.path.join("stores", setting.slug)]
        times[name] = (t.seconds, fill_s)
        stores[name] = FeatureStore.open(os.path.join(root, "stores", setting.slug))
    (one, (t1, f1)), (two, (t2, f2)) = times.items()
    a, b = stores.values()
    with open(os.path.join(a.path, FEATURES), "rb") as fa, open(os.path.join(b.path, FEATURES), "rb") as fb:
        same = fa.read() == fb.read()
    n = a.metadata["n"]
    print(f"featurize N={n} {args.output_fn} K={args.K} k={args.k}, 1 thread per process")
    print(f"  {'':<24} {'wall':>8} {'store fill':>11}  (fill: create to sealed, rank 0's clock; wall adds start-up)")
    print(f"  {one:<24} {t1:7.1f}s {f1:10.1f}s")
    print(f"  {two:<24} {t2:7.1f}s {f2:10.1f}s")
    print(f"  speed-up {t1 / t2:.2f}x wall, {f1 / f2:.2f}x fill; stores bit-identical: {same}")
    shutil.rmtree(args.dir, ignore_errors=True)
    print(machine_line())


if __name__ == "__main__":
    main()
