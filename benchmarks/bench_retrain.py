"""Sequential vs batched retraining on the default recipe, measured side by side in one run.

    python benchmarks/bench_retrain.py [--steps 60] [--models 1 4 8] [--threads 2]

For each M, trains M models on M random half-subsets: once one after another with
`training.train` (as `retrain` does), once together with `retrain.train_many`, for `--steps`
optimiser steps (the per-step cost is constant, so a full 1500-step retrain costs
1500 / steps times more). Prints seconds per model-retrain extrapolated to the full recipe and the
speedup. Numbers depend on how busy the machine is: both columns are measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dtrak_core.evaluation.retrain import retrain, train_many
from dtrak_core.model.data import load_digits
from dtrak_core.model.training import TrainConfig
from dtrak_core.model.unet import build_scheduler


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps measured per model (default 60)")
    parser.add_argument("--models", type=int, nargs="+", default=[1, 4, 8], help="models trained at once")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    full = TrainConfig()
    config = replace(full, steps=args.steps)
    images = load_digits("train").images
    scheduler = build_scheduler()
    rng = np.random.default_rng(0)
    print(f"default recipe {full.block_out_channels}, batch {full.batch_size}; {args.steps} steps measured, "
          f"extrapolated to {full.steps}; {args.threads} threads")
    print(f"{'M':>3} {'sequential s/model':>19} {'batched s/model':>16} {'speedup':>8}")
    for M in args.models:
        keeps = [np.sort(rng.choice(len(images), len(images) // 2, replace=False)) for _ in range(M)]
        seeds = list(range(1, M + 1))
        t0 = time.perf_counter()
        for keep, seed in zip(keeps, seeds):
            retrain(images, keep, scheduler, replace(config, seed=seed), show_bar=False)
        seq = (time.perf_counter() - t0) / M * full.steps / args.steps
        t0 = time.perf_counter()
        train_many(images, keeps, seeds, scheduler, config, show_bar=False)
        bat = (time.perf_counter() - t0) / M * full.steps / args.steps
        print(f"{M:>3} {seq:>19.1f} {bat:>16.1f} {seq / bat:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
