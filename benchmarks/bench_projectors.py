"""Benchmark 3: projectors at k = 1024 .. 32768 for d = the default UNet's parameter count.

- dense:  our `DenseGaussianProjector` (tiles regenerated per call, at most 256 MiB at once)
- sparse: our `SparseJLProjector` (c = 4 nonzeros per input coordinate, CSR product)
- trak:   traker's CPU projector `BasicProjector` (normal, float32, 100-column blocks regenerated
          per call), scaled by 1/sqrt(k) here so that its inner products are comparable

Time per 1,000 vectors: one call on a batch of --batch vectors (the store fills 256-row slices),
scaled to 1,000. Dense and trak regenerate their matrix on every call, so their cost per vector
falls with the batch size; sparse costs the same per vector at any batch size.

Distortion: real per-sample gradients (output 'square', K=10, of --n-vectors training digits);
for every pair, |<Px, Py> - <x, y>| / (|x| |y|), mean and max over pairs (including x = y).

    python benchmarks/bench_projectors.py --k 1024 4096 16384 32768 --threads 1
"""
from __future__ import annotations

from common import Timer, load_model, machine_line, set_threads  # first: before torch

# isort: split
import argparse
import math

import torch

from dtrak_core.attribution.gradients import GradientFeaturizer
from dtrak_core.attribution.projectors import DenseGaussianProjector, SparseJLProjector
from dtrak_core.model.data import load_digits


def trak_projector(d: int, k: int, seed: int):
    from trak.projectors import BasicProjector, ProjectionType

    p = BasicProjector(grad_dim=d, proj_dim=k, seed=seed, proj_type=ProjectionType.normal, device="cpu",
                       dtype=torch.float32)
    return lambda x: p.project(x, model_id=0) / math.sqrt(k)


def distortion(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    gx, gy = x.double() @ x.double().T, y.double() @ y.double().T
    norms = gx.diagonal().sqrt()
    rel = (gy - gx).abs() / torch.outer(norms, norms)
    return rel.mean().item(), rel.max().item()


def main(args):
    set_threads(args.threads)
    print(machine_line())
    unet, scheduler, what = load_model(args.fresh_model)
    g = GradientFeaturizer(unet, scheduler, "square", 10)
    vectors = g(load_digits("train").images[:args.n_vectors])
    d = vectors.shape[1]
    batch = vectors.repeat(math.ceil(args.batch / len(vectors)), 1)[:args.batch]
    print(f"model: {what}; d = {d}, timing batch {args.batch} vectors per call, distortion over "
          f"{args.n_vectors} per-sample gradients")
    print(f"{'k':>6} {'projector':<7} {'s / 1000 vectors':>17} {'vs sparse':>10} {'mean rel. err':>14} {'max rel. err':>13}")
    for k in args.k:
        makers = {"sparse": lambda: SparseJLProjector(d, k, seed=42).project,
                  "dense": lambda: DenseGaussianProjector(d, k, seed=42).project,
                  "trak": lambda: trak_projector(d, k, seed=42)}
        times = {}
        for name in args.projectors:
            project = makers[name]()
            if name == "sparse":
                project(batch[:2])  # warm-up; dense and trak rebuild everything per call anyway
            with Timer() as t:
                out = project(batch)
            times[name] = t.seconds / args.batch * 1000
            mean, worst = distortion(vectors, out[:len(vectors)])  # the batch starts with the real vectors
            ratio = times[name] / times["sparse"] if "sparse" in times else float("nan")
            print(f"{k:>6} {name:<7} {times[name]:>17.2f} {ratio:>9.1f}x {mean:>14.5f} {worst:>13.5f}", flush=True)
    print(machine_line().replace("machine:", "machine at end:"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--projectors", nargs="+", default=["sparse", "dense", "trak"], choices=["sparse", "dense", "trak"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--n-vectors", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--fresh-model", action="store_true")
    main(parser.parse_args())
