"""LDS evaluation cost: one method's lambda sweep + bootstrap, direct vs the benchmark's path.

Direct: for each lambda of the grid, fit `TRAKScorer` (an N x N solve) and sum the scores over the
subsets; bootstrap by ranking resampled copies with scipy. Benchmark path (`lds.lambda_sweep` +
`benchmark.trak_g_fn`): one SVD of the training features gives every lambda's subset sums at
O(M r Q) (`scoring.SpectralTRAK`), and the bootstrap ranks from subset counts (`lds.SubsetBootstrap`).
Sizes are the default's: N = 1500, k = 2048, Q = 297, M = 64, 36 lambdas, 1000 resamples.

    python benchmarks/bench_lds_eval.py
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import rankdata  # noqa: E402

import dtrak_core  # noqa: E402,F401
from dtrak_core.attribution.scoring import TRAKScorer  # noqa: E402
from dtrak_core.evaluation.lds import SubsetBootstrap, rank_corr  # noqa: E402
from dtrak_core.evaluation.tables import LAMBDA_GRID, trak_g_fn  # noqa: E402


def direct(phi, q, masks, F, grid, draws):
    sums = [masks @ TRAKScorer(lam=lam).fit(phi).scores(q).T for lam in grid]
    means = [np.nanmean(rank_corr(g, -F)) for g in sums]
    best = sums[int(np.argmax(means))]
    boot = []
    for idx in draws:
        a, b = rankdata(best[idx], axis=0), rankdata(-F[idx], axis=0)
        a -= a.mean(0)
        b -= b.mean(0)
        den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
        with np.errstate(invalid="ignore", divide="ignore"):
            boot.append(np.nanmean(np.where(den > 1e-9, (a * b).sum(0) / den, np.nan)))
    return np.array(means), float(np.nanstd(boot))


def fast(phi, q, masks, F, grid, num):
    g_fn = trak_g_fn([phi], {"v": [q]}, masks)
    sums = [g_fn(lam)["v"] for lam in grid]
    means = [np.nanmean(rank_corr(g, -F)) for g in sums]
    best = sums[int(np.argmax(means))]
    return np.array(means), SubsetBootstrap(len(masks), num).std_of_mean(best, -F)


def main():
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    N, k, Q, M, B = 1500, 2048, 297, 64, 1000
    phi = rng.normal(size=(N, k)) * 0.05
    q = phi[:Q] + rng.normal(size=(Q, k)) * 0.05
    masks = (rng.random((M, N)) < 0.5).astype(np.float64)
    F = -(masks @ (q @ phi.T).T) * 1e-3 + rng.normal(size=(M, Q))
    draws = np.random.default_rng(0).integers(0, M, (B, M))
    grid = list(LAMBDA_GRID)
    t0 = time.perf_counter()
    m_direct, pm_direct = direct(phi, q, masks, F, grid, draws)
    t_direct = time.perf_counter() - t0
    t0 = time.perf_counter()
    m_fast, pm_fast = fast(phi, q, masks, F, grid, B)
    t_fast = time.perf_counter() - t0
    print(f"one method, one test set, {len(grid)} lambdas, {B} bootstrap resamples (1 thread)")
    print(f"  direct (solve per lambda, scipy ranks per resample): {t_direct:7.2f} s")
    print(f"  SpectralTRAK + SubsetBootstrap:                       {t_fast:7.2f} s   ({t_direct / t_fast:.1f}x faster)")
    print(f"  max |LDS difference| over lambdas: {np.max(np.abs(m_direct - m_fast)):.2e}; "
          f"+- {pm_direct:.5f} vs {pm_fast:.5f}")


if __name__ == "__main__":
    main()
