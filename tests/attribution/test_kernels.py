"""The model-free baselines against direct computations on tiny cases."""
import math

import numpy as np
import pytest
import torch

from dtrak_core.attribution.kernels import KernelRidge, kernel, optimal_denoiser_scores
from dtrak_core.evaluation.lds import lds, rank_normalise, top_share


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(12, 1, 3, 3, generator=g) * 2 - 1, torch.rand(4, 1, 3, 3, generator=g) * 2 - 1


@pytest.mark.parametrize("name", ["linear", "rbf", "arccos"])
def test_kernel_ridge_is_the_direct_solve(data, name):
    train, queries = data
    ridge = KernelRidge(name, gamma=0.7).fit(train)
    for lam in (1e-3, 0.3, ridge.default_lambda):
        K = kernel(train, train, name, 0.7).numpy()
        kq = kernel(queries, train, name, 0.7).numpy()
        direct = np.linalg.solve(K + lam * np.eye(len(K)), kq.T).T
        np.testing.assert_allclose(ridge.scores(queries, lam), direct, rtol=1e-6, atol=1e-8)


def test_kernels_match_their_formulas(data):
    train, queries = data
    a, b = queries.flatten(1).double(), train.flatten(1).double()
    i, j = 1, 5
    assert kernel(queries, train, "linear")[i, j] == pytest.approx(float(a[i] @ b[j]))
    d2 = float(((a[i] - b[j]) ** 2).sum())
    assert kernel(queries, train, "rbf", 2.0)[i, j] == pytest.approx(math.exp(-2.0 * d2 / 9))
    # order-1 arc-cosine kernel = 2 E_w[relu(w.x) relu(w.y)], w ~ N(0, I): an infinitely wide ReLU layer
    w = torch.randn(400_000, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mc = 2 * (torch.relu(w @ a[i]) * torch.relu(w @ b[j])).mean()
    assert kernel(queries, train, "arccos")[i, j] == pytest.approx(float(mc), rel=0.02)
    with pytest.raises(ValueError, match="unknown kernel"):
        kernel(queries, train, "poly")


def test_optimal_denoiser_is_the_posterior_of_a_plain_loop(data):
    train, queries = data
    abar = torch.linspace(0.99, 0.01, 100, dtype=torch.float64)
    got = optimal_denoiser_scores(queries, train, abar, timesteps=[10, 60], noise_draws=2, seed=3)
    gen = torch.Generator().manual_seed(3)
    want = np.zeros((4, 12))
    for t in (10, 60):
        a = float(abar[t])
        for _ in range(2):
            noise = torch.randn(9, generator=gen, dtype=torch.float64)
            for q in range(4):
                xt = math.sqrt(a) * queries[q].flatten().double() + math.sqrt(1 - a) * noise
                logw = np.array([-float(((xt - math.sqrt(a) * train[n].flatten().double()) ** 2).sum()) / (2 * (1 - a))
                                 for n in range(12)])
                w = np.exp(logw - logw.max())
                want[q] += w / w.sum() / 4
    np.testing.assert_allclose(got, want, rtol=1e-9)
    np.testing.assert_allclose(got.sum(1), 1.0)


def test_rank_and_top_share_lds_ignore_monotone_transforms():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(5, 40))
    masks = rng.random((8, 40)) < 0.5
    F = rng.normal(size=(8, 5))
    for transform in (rank_normalise, top_share):
        base = lds(transform(scores), masks, F, num_bootstrap=0)[0]
        for f in (np.exp, lambda s: s * np.abs(s), lambda s: 3 * s + 1):
            assert lds(transform(f(scores)), masks, F, num_bootstrap=0)[0] == pytest.approx(base)
    assert lds(scores * np.abs(scores), masks, F, num_bootstrap=0)[0] != pytest.approx(lds(scores, masks, F, num_bootstrap=0)[0])
    top = top_share(scores, 0.1)
    assert (top.sum(1) == 4).all() and set(np.unique(top)) == {0.0, 1.0}
    assert (top[np.arange(5), scores.argmax(1)] == 1).all()
