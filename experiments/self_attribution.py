"""Sanity check: a training image should be among its own top proponents.

For 100 training images (every 15th), attribute the image itself against the full store and
report the share whose own index is the top-1 / in the top-5 / top-10 proponents, per method,
with the end-to-end time per image.

    python experiments/self_attribution.py [--root assets] [--methods square loss]
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dtrak_core.attribution.attributor import Attributor


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="assets")
    p.add_argument("--methods", nargs="+", default=["square", "loss"])
    p.add_argument("--count", type=int, default=100)
    args = p.parse_args()
    attributor = Attributor.load(args.root)
    n = len(attributor.train)
    idx = np.arange(0, n, n // args.count)[: args.count]
    print(f"{len(idx)} training images, {torch.get_num_threads()} threads")
    for method in args.methods:
        attributor.scorer(method)  # fit once, outside the timing
        t0 = time.perf_counter()
        scores = attributor.scores(attributor.train.images[idx], method)
        seconds = time.perf_counter() - t0
        ranks = np.array([(row > row[i]).sum() for row, i in zip(scores, idx)])
        print(f"{method:>10}: top-1 {np.mean(ranks == 0):.2f}  top-5 {np.mean(ranks < 5):.2f}  "
              f"top-10 {np.mean(ranks < 10):.2f}  median rank {np.median(ranks):.0f}  "
              f"({seconds / len(idx) * 1000:.0f} ms per image in a batch)")


if __name__ == "__main__":
    main()
