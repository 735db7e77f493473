"""How large must the projection be? Projected scores vs exact (unprojected) TRAK scores.

With the default model, for one output function at K timesteps: computes the full per-sample
gradients (d = 159,697) of all 1,500 training digits and of Q generated queries, the exact TRAK
scores from them (dual form, same lambda rule), and the scores after sparse-JL and dense-Gaussian
projection to several k. Prints the mean Spearman correlation with the exact scores, the top-10
overlap, and the store size per k. The default k is the smallest whose Spearman is >= 0.99.

    python experiments/choose_k.py [--method square] [--K 10] [--queries 32]
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dtrak_core.attribution.attributor import Attributor  # noqa: E402
from dtrak_core.attribution.gradients import GradientFeaturizer  # noqa: E402
from dtrak_core.attribution.projectors import DenseGaussianProjector, SparseJLProjector  # noqa: E402
from dtrak_core.attribution.scoring import TRAKScorer  # noqa: E402
from dtrak_core.model.sampling import generate  # noqa: E402


def compare(exact, approx, top=10):
    rho = np.mean([spearmanr(e, a)[0] for e, a in zip(exact, approx)])
    overlap = np.mean([len(set(np.argsort(-e)[:top]) & set(np.argsort(-a)[:top])) / top for e, a in zip(exact, approx)])
    return rho, overlap


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="assets")
    p.add_argument("--method", default="square")
    p.add_argument("--K", type=int, default=10)
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--ks", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    args = p.parse_args()
    attributor = Attributor.load(args.root)
    grads = GradientFeaturizer(attributor.unet, attributor.scheduler, args.method, args.K)
    t0 = time.perf_counter()
    train = torch.cat([grads(attributor.train.images[i:i + 64]) for i in range(0, len(attributor.train), 64)])
    queries = grads(generate(attributor.unet, attributor.scheduler, range(args.queries)))
    print(f"{args.method} K={args.K}: full gradients of {len(train)} + {len(queries)} samples, d={train.shape[1]}, "
          f"{time.perf_counter() - t0:.0f} s, {torch.get_num_threads()} threads")
    exact = TRAKScorer().fit(train).scores(queries)
    print(f"{'projector':>15} {'k':>6} {'spearman':>9} {'top-10 overlap':>15} {'store MB':>9}")
    for k in args.ks:
        for name, proj in [("sparse-jl", SparseJLProjector(train.shape[1], k)),
                           ("dense-gaussian", DenseGaussianProjector(train.shape[1], k) if k <= 2048 else None)]:
            if proj is None:
                continue
            approx = TRAKScorer().fit(proj.project(train)).scores(proj.project(queries))
            rho, overlap = compare(exact, approx)
            print(f"{name:>15} {k:>6} {rho:>9.4f} {overlap:>15.2f} {len(train) * k * 4 / 2**20:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
