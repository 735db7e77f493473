"""Shared helpers for the benchmarks: the model under test, machine facts, timing, statistics.

Import this module before torch (each benchmark does): it imports `dtrak_core` first, which sets
OMP_WAIT_POLICY=PASSIVE as the app and CLI get it. Every benchmark prints one `machine:` line first (cores, torch threads, load average), because the
numbers come from a 2-core machine shared with other jobs: compare the ratios printed in one run,
not absolute times across runs.
"""
from __future__ import annotations

import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import dtrak_core  # noqa: E402,F401  first: it sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dtrak_core.model.unet import build_scheduler, build_unet, load_checkpoint  # noqa: E402

ASSETS_MODEL = os.path.join(ROOT, "assets", "model")


def load_model(fresh: bool = False):
    """(unet, scheduler, description): the default model from assets/ when it exists, else a
    freshly initialised default-architecture UNet."""
    if not fresh and os.path.isfile(os.path.join(ASSETS_MODEL, "unet", "config.json")):
        unet, scheduler = load_checkpoint(ASSETS_MODEL)
        return unet, scheduler, "assets/model (the trained default)"
    return build_unet(seed=0).eval(), build_scheduler(), "build_unet(seed=0), freshly initialised"


def set_threads(threads: int | None) -> int:
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# where the benchmarks compute unless a script takes --device (and then prints its own `device:` line)
DEVICE = "cpu" + ("" if not torch.cuda.is_available() else f" ({torch.cuda.device_count()} CUDA device(s) present, unused)")


def machine_line() -> str:
    load = os.getloadavg()
    return (f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
            f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} (1/5/15 min), device {DEVICE}")


class Timer:
    """`with Timer() as t: ...` then t.seconds (wall clock)."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def best_of(fn, repeats: int) -> float:
    """Minimum wall time of `repeats` calls: the least disturbed by other jobs on a shared machine."""
    times = []
    for _ in range(repeats):
        with Timer() as t:
            fn()
        times.append(t.seconds)
    return min(times)


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each row of a with the same row of b (Q, N) -> (Q,)."""
    from scipy.stats import spearmanr

    return np.array([spearmanr(x, y).statistic for x, y in zip(np.asarray(a), np.asarray(b))])


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
