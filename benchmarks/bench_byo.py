"""Benchmark 9: what featurizing costs for your own model, measured against the default.

`python -m dtrak_core build` featurizes every training image at K timesteps; its cost is
(seconds per image per timestep) x N x K. This measures that unit cost side by side, interleaved
(round robin, median of --repeats) for

- the default digits UNet (1x8x8, 159,697 parameters), and
- the architecture of google/ddpm-cifar10-32 (3x32x32, 35.7M parameters, self-attention at 16x16),
  freshly initialised (the weights do not change the cost; no download),

and prints the ratio and what a full build would take at K = 10 and 100.

    python benchmarks/bench_byo.py --threads 2
"""
from __future__ import annotations

from common import Timer, machine_line, set_threads  # first: before torch

# isort: split
import argparse
import statistics

import torch
from diffusers import UNet2DModel

from dtrak_core.attribution.features import FeatureSetting, Featurizer
from dtrak_core.model.unet import build_scheduler, build_unet, count_parameters


def cifar10_ddpm_unet() -> UNet2DModel:
    """google/ddpm-cifar10-32's UNet config (its unet/config.json), randomly initialised."""
    torch.manual_seed(0)
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                       layers_per_block=2,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")).eval()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=8, help="images per featurizer call")
    p.add_argument("--K", type=int, default=10, help="timesteps per call (the cost is linear in K)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    set_threads(args.threads)
    print(machine_line())
    scheduler = build_scheduler()
    models = {"default digits UNet": build_unet(seed=0).eval(), "ddpm-cifar10-32 architecture": cifar10_ddpm_unet()}
    featurizers = {name: Featurizer(unet, scheduler, FeatureSetting("square", K=args.K, k=2048))
                   for name, unet in models.items()}
    inputs = {name: torch.randn(args.batch, u.config.in_channels, u.config.sample_size, u.config.sample_size)
              for name, u in models.items()}
    for name in models:  # warm-up: builds the projector, first-call allocations
        featurizers[name](inputs[name][:1])
    times = {name: [] for name in models}
    for _ in range(args.repeats):
        for name in models:  # interleaved: both see the same machine load
            with Timer() as t:
                featurizers[name](inputs[name])
            times[name].append(t.seconds / (args.batch * args.K))
    unit = {name: statistics.median(v) for name, v in times.items()}
    for name, unet in models.items():
        print(f"{name}: {count_parameters(unet):,} parameters, {unit[name] * 1e3:.2f} ms per image per timestep "
              f"(median of {args.repeats}; {args.batch} images x K={args.K} per call)")
    a, b = unit["ddpm-cifar10-32 architecture"], unit["default digits UNet"]
    print(f"ratio cifar10 / default: {a / b:.0f}x")
    for n, K in ((1500, 100), (5000, 10), (5000, 100)):
        print(f"  a store of {n:,} images at K={K}: default {n * K * b / 60:.1f} min, "
              f"cifar10 architecture {n * K * a / 3600:.1f} h")
    print(machine_line())


if __name__ == "__main__":
    main()
