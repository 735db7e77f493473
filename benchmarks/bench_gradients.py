"""Benchmark 2: per-sample gradients vs the limit.

limit = a plain batched forward + backward of the same output function over the same N x K
(sample, timestep) pairs (one batch, weight gradients summed over the batch, as in training).
We time `GradientFeaturizer` (exact per-sample gradients, averaged over the K timesteps) with
each engine and print the ratio to that limit (goal <= 3x).

    python benchmarks/bench_gradients.py --n 32 --K 10 100 --threads 1
    python benchmarks/bench_gradients.py --n 16 --K 100 --profile      # top ops of each engine
"""
from __future__ import annotations

from common import best_of, load_model, machine_line, set_threads  # first: before torch

# isort: split
import argparse

import torch

from dtrak_core.attribution.gradients import GradientFeaturizer
from dtrak_core.model.data import load_digits


def plain_step(unet, g: GradientFeaturizer, x: torch.Tensor):
    """One batched forward+backward over all (sample, timestep) pairs of x."""
    B, K = len(x), g.K

    def run():
        eps = g.noise.repeat(B, 1, 1, 1)
        xt = g.scheduler.add_noise(x.repeat_interleave(K, 0), eps, g.timesteps.repeat(B))
        pred = unet(xt, g.timesteps.repeat(B), return_dict=False)[0]
        g.f(pred, eps, g.weights.repeat(B)).sum().backward()
        unet.zero_grad(set_to_none=True)

    return run


def main(args):
    set_threads(args.threads)
    print(machine_line())
    unet, scheduler, what = load_model(args.fresh_model)
    x = load_digits("train").images[:args.n]
    print(f"model: {what}; output function {args.output_fn!r}, N={args.n} samples, best of {args.repeats} (round robin)")
    for K in args.K:
        engines = {e: GradientFeaturizer(unet, scheduler, args.output_fn, K, engine=e) for e in args.engines}
        runs = {"plain": plain_step(unet, next(iter(engines.values())), x)}
        runs.update({name: (lambda g=g: g(x)) for name, g in engines.items()})
        for fn in runs.values():
            fn()  # warm-up
        # Round robin: each repeat times every variant once, so load changes hit all alike; keep the minimum.
        times = {name: float("inf") for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                times[name] = min(times[name], best_of(fn, 1))
        limit = times["plain"]
        print(f"K={K:>4}: plain forward+backward of {args.n}x{K} pairs: {limit:.3f} s")
        for name, g in engines.items():
            t = times[name]
            print(f"K={K:>4}: engine={name:<5} {t:.3f} s = {args.n / t:7.2f} samples/s; "
                  f"RATIO to plain: {t / limit:.2f}x (goal <= 3x)")
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    g(x)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    print(machine_line().replace("machine:", "machine at end:"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32, help="samples (the Featurizer's batch size is 32)")
    parser.add_argument("--K", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--output-fn", default="square")
    parser.add_argument("--engines", nargs="+", default=["hooks", "vmap"], choices=["hooks", "vmap"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--fresh-model", action="store_true")
    main(parser.parse_args())
