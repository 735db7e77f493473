"""The Counterfactual tab's retrain estimate against the retrain it predicts, measured in one run.

    python benchmarks/bench_retrain_estimate.py [--root assets] [--seed 1002] [--repeats 2]

For each repeat: the probe estimate the tab shows before a first retrain (`app_support.measure_retrain`:
a 1-step and a 7-step training run, their difference per step times the recipe's steps, plus the
set-up they share), then one real `remove_and_retrain` of the digits recipe, then the estimate the tab
shows after it (`RetrainCost.from_retrain`, the last live retrain's time). Prints each estimate's
ratio to the actual time; the goal is within 30% (0.7-1.3). The old probe (6 steps timed after one
untimed warm-up step, set-up included) is printed beside it for comparison.
"""
from __future__ import annotations

from common import ROOT, machine_line  # first: before torch

# isort: split
import argparse
import os
import time
from dataclasses import replace

from dtrak_core import app_support as sup
from dtrak_core.attribution.attributor import Attributor
from dtrak_core.evaluation import counterfactual as cf
from dtrak_core.model.training import train


def old_probe(images, scheduler, config, probe_steps: int = 6) -> float:
    """The estimate before this calibration: 6 timed steps (set-up included) scaled to the recipe."""
    train(images, scheduler, replace(config, steps=1), show_bar=False)
    t0 = time.perf_counter()
    train(images, scheduler, replace(config, steps=probe_steps), show_bar=False)
    return (time.perf_counter() - t0) / probe_steps * config.steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.join(ROOT, "assets"))
    parser.add_argument("--seed", type=int, default=1002)
    parser.add_argument("--k", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    print(machine_line())
    attributor = Attributor.load(args.root)
    config = cf.train_config_from_manifest(args.root)
    images, scheduler = attributor.train.images, attributor.scheduler
    print(f"recipe: {config.steps} steps, batch {config.batch_size}; target seed {args.seed}, k = {args.k}")
    print(f"{'repeat':>6} {'actual s':>9} {'probe s':>8} {'probe/actual':>12} {'old probe/actual':>16} "
          f"{'last-retrain/actual':>19}")
    last = None
    for r in range(args.repeats):
        probe = sup.measure_retrain(images, scheduler, config).seconds
        old = old_probe(images, scheduler, config)
        t0 = time.perf_counter()
        result = cf.remove_and_retrain(attributor, args.seed, "d-trak", args.k, config=config)
        actual = time.perf_counter() - t0
        seen = "" if last is None else f"{last / actual:19.2f}"
        print(f"{r:>6} {actual:9.1f} {probe:8.1f} {probe / actual:12.2f} {old / actual:16.2f} {seen:>19}")
        last = sup.RetrainCost.from_retrain(result.train_seconds, config.steps).seconds


if __name__ == "__main__":
    main()
