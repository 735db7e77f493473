"""Benchmark 4: query latency, one new image attributed against the full training store.

End to end through `Attributor` (what the CLI and the app call): featurize the image (per-sample
gradient at K timesteps + projection) and score it against all N training features.

- load:  `Attributor.load(assets)` (model, training set, stores; sha256 of every store checked)
- cold:  the first `attribute` call of a method: also reads the store and solves the N x N ridge
         system of the scorer (cached afterwards)
- warm:  later calls (median of --repeats): what a user waits for per new image

K=100 uses the default store from assets/. For K=10 a store with the same setting but K=10 is built
once under runs/bench/ (git-ignored), since assets/ ships K=100 only. Also prints the effect of
float16 storage of the features on the scores (Spearman and top-10 overlap vs float32).

    python benchmarks/bench_query.py --threads 1
"""
from __future__ import annotations

from common import ROOT, Timer, machine_line, set_threads, spearman_rows  # first: before torch

# isort: split
import argparse
import os
import statistics

import numpy as np

from dtrak_core.attribution.attributor import Attributor
from dtrak_core.attribution.features import Featurizer
from dtrak_core.attribution.scoring import TRAKScorer
from dtrak_core.attribution.store import FeatureStore
from dtrak_core.model.data import load_digits
from dtrak_core.model.unet import checkpoint_hash


def k10_store(attributor: Attributor, setting) -> FeatureStore:
    path = os.path.join(ROOT, "runs", "bench", "stores", setting.slug)
    identity = FeatureStore.identity(setting, checkpoint_hash(attributor.unet), attributor.train.fingerprint)
    store = FeatureStore.create(path, identity, len(attributor.train), setting.k)
    if not store.complete:
        with Timer() as t:
            store.fill(Featurizer(attributor.unet, attributor.scheduler, setting), attributor.train.images, show_bar=False)
        print(f"(built the K={setting.K} store for {len(attributor.train)} training images in {t.seconds:.0f} s)")
    return FeatureStore.open(path)


def main(args):
    set_threads(args.threads)
    print(machine_line())
    with Timer() as t:
        attributor = Attributor.load(args.assets)
    print(f"Attributor.load({args.assets!r}): {t.seconds:.2f} s; methods {attributor.methods}, N={len(attributor.train)}")
    setting, store = attributor.setting(args.method)
    if setting.K != 10 and 10 in args.K:
        extra = k10_store(attributor, setting.with_(K=10))
        attributor = Attributor(attributor.unet, attributor.scheduler, attributor.train, [store, extra])
    images = load_digits("validation").images[:args.repeats + 1]
    for K in args.K:
        with Timer() as cold:
            attributor.attribute(images[0], args.method, K=K)
        warm = []
        for img in images[1:]:
            with Timer() as t:
                attributor.attribute(img, args.method, K=K)
            warm.append(t.seconds)
        print(f"K={K:>4} ({args.method}): cold {cold.seconds:.3f} s, warm median {statistics.median(warm):.3f} s "
              f"[min {min(warm):.3f}, max {max(warm):.3f}]" + ("  (goal <= 1 s)" if K == 100 else ""))

    # float16 storage: same scorer fitted on features rounded to float16
    setting, store = attributor.setting(args.method, K=max(args.K))
    phi = np.asarray(store.features())
    q = Featurizer(attributor.unet, attributor.scheduler, setting)(images)
    s32 = TRAKScorer().fit(phi).scores(q)
    s16 = TRAKScorer().fit(phi.astype(np.float16).astype(np.float32)).scores(q.numpy().astype(np.float16).astype(np.float32))
    rho = spearman_rows(s32, s16)
    overlap = np.mean([len(set(np.argsort(-a)[:10]) & set(np.argsort(-b)[:10])) / 10 for a, b in zip(s32, s16)])
    print(f"float16 feature storage ({phi.nbytes / 2**20:.1f} MiB -> {phi.nbytes / 2**21:.1f} MiB): Spearman vs float32 "
          f"{rho.mean():.6f} [min {rho.min():.6f}], top-10 proponent overlap {overlap:.3f}, over {len(q)} queries")
    print(machine_line().replace("machine:", "machine at end:"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=os.path.join(ROOT, "assets"))
    parser.add_argument("--method", default="d-trak")
    parser.add_argument("--K", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    main(parser.parse_args())
