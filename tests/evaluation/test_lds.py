"""The LDS metric (evaluation/lds.py) against brute-force references: Spearman per sample, the
subset bootstrap, input checks, the noise ceiling and the lambda sweeps."""
import numpy as np
import pytest
from scipy.stats import spearmanr

from dtrak_core.attribution.scoring import TRAKScorer
from dtrak_core.evaluation.lds import (
    SubsetBootstrap,
    lambda_study,
    lambda_sweep,
    lds,
    lds_per_sample,
    noise_ceiling,
    rank_corr,
)

pytestmark = pytest.mark.usefixtures("one_thread")

def brute_force_lds(scores, masks, F):
    """Per sample, with loops and scipy: Spearman over subsets of sum-of-member-scores vs -F."""
    Q, M = scores.shape[0], masks.shape[0]
    out = []
    for q in range(Q):
        g = [sum(scores[q, i] for i in range(masks.shape[1]) if masks[m, i]) for m in range(M)]
        out.append(spearmanr(g, [-F[m, q] for m in range(M)]).correlation)
    return np.array(out)


def test_lds_equals_brute_force():
    rng = np.random.default_rng(0)
    Q, N, M = 5, 12, 9
    scores = rng.normal(size=(Q, N))
    masks = rng.random((M, N)) < 0.5
    F = rng.normal(size=(M, Q))
    ref = brute_force_lds(scores, masks, F)
    np.testing.assert_allclose(lds_per_sample(scores, masks, F), ref, atol=1e-12)
    value, pm = lds(scores, masks, F, num_bootstrap=200)
    assert value == pytest.approx(100 * ref.mean())
    assert pm > 0


def test_lds_sign_a_proponent_lowers_the_loss():
    # F is lower exactly when the subset contains more of the positively scored samples -> LDS = +100
    rng = np.random.default_rng(1)
    N, M = 10, 20
    scores = rng.normal(size=(1, N))
    masks = rng.random((M, N)) < 0.5
    F = -(masks @ scores[0])[:, None] + 5.0
    assert lds(scores, masks, F, num_bootstrap=10)[0] == pytest.approx(100.0)
    assert lds(-scores, masks, F, num_bootstrap=10)[0] == pytest.approx(-100.0)


def test_bootstrap_is_over_subsets():
    rng = np.random.default_rng(2)
    scores, masks, F = rng.normal(size=(4, 8)), rng.random((30, 8)) < 0.5, rng.normal(size=(30, 4))
    # reference bootstrap written out directly
    r = np.random.default_rng(0)
    g = [[sum(scores[q, i] for i in range(8) if masks[m, i]) for m in range(30)] for q in range(4)]  # once per subset:
    boot = []  # a resampled duplicate must tie exactly with its original
    for idx in r.integers(0, 30, (50, 30)):
        boot.append(np.mean([spearmanr(np.array(g[q])[idx], -F[idx, q]).correlation for q in range(4)]))
    assert lds(scores, masks, F, num_bootstrap=50, seed=0)[1] == pytest.approx(100 * np.std(boot))


def test_bootstrap_rank_corr_equals_resampled_arrays():
    # ties on purpose (small integers): average ranks must match scipy's on the resampled rows
    rng = np.random.default_rng(0)
    M, Q = 9, 7
    a = rng.integers(0, 4, (M, Q)).astype(float)
    b = rng.integers(0, 3, (M, Q)).astype(float)
    boot = SubsetBootstrap(M, num=40, seed=3)
    fast = boot.rank_corr(a, b)
    draws = np.random.default_rng(3).integers(0, M, (40, M))
    slow = np.array([rank_corr(a[idx], b[idx]) for idx in draws])
    np.testing.assert_allclose(fast, slow, atol=1e-12)  # nan where a resample is constant, in both


def test_lds_input_validation():
    with pytest.raises(ValueError, match="shapes"):
        lds(np.ones((2, 5)), np.ones((4, 6), bool), np.ones((4, 2)))
    with pytest.raises(ValueError, match="at least 3"):
        lds(np.ones((2, 5)), np.ones((2, 5), bool), np.ones((2, 2)))
    with pytest.raises(ValueError, match="finite"):
        lds(np.ones((2, 5)), np.ones((4, 5), bool), np.full((4, 2), np.nan))


def test_noise_ceiling_against_direct_computation():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(12, 6))
    F_seeds = np.stack([base + 0.5 * rng.normal(size=base.shape) for _ in range(2)])
    r = np.mean([spearmanr(F_seeds[0][:, q], F_seeds[1][:, q]).correlation for q in range(6)])
    c = noise_ceiling(F_seeds, num_bootstrap=20)
    assert c["seed_vs_seed"] == pytest.approx(100 * r)
    assert c["ceiling"] == pytest.approx(100 * np.sqrt(2 * r / (1 + r)))
    # an LDS against one seed's ground truth (the second seed trained only to measure the noise)
    one = noise_ceiling(F_seeds, num_bootstrap=20, target_seeds=1)
    assert one["ceiling"] == pytest.approx(100 * np.sqrt(r)) and one["seed_vs_seed"] == c["seed_vs_seed"]


def test_lambda_sweep_over_sets_equals_one_set_at_a_time():
    rng = np.random.default_rng(1)
    N, k, M = 25, 6, 10
    phi = rng.normal(size=(N, k))
    qs = {"a": rng.normal(size=(5, k)), "b": rng.normal(size=(4, k))}
    masks = rng.random((M, N)) < 0.5
    F = {"a": rng.normal(size=(M, 5)), "b": rng.normal(size=(M, 4))}
    grid = (1e-2, 1.0, 1e2)
    both = lambda_sweep(lambda lam: {n: masks @ TRAKScorer(lam=lam).fit(phi).scores(q).T for n, q in qs.items()}, F, grid, 30)
    for name in qs:
        one = lambda_study(phi, qs[name], masks, F[name], grid=grid, num_bootstrap=30)
        for key in ("paper", "honest"):
            assert both[name][key]["lds"] == pytest.approx(one[key]["lds"])
            assert both[name][key]["pm"] == pytest.approx(one[key]["pm"])
        # honest LDS is the per-sample LDS at each half's pick, averaged
        assert both[name]["paper"]["lds"] == pytest.approx(max(both[name]["lds_by_lambda"]))


def test_lambda_study_picks_and_reports(tiny_unet):
    rng = np.random.default_rng(4)
    N, k, Q, M = 30, 8, 10, 12
    phi = rng.normal(size=(N, k))
    q = rng.normal(size=(Q, k))
    masks = rng.random((M, N)) < 0.5
    F = rng.normal(size=(M, Q))
    grid = (1e-2, 1.0, 1e2)
    res = lambda_study(phi, q, masks, F, grid=grid, num_bootstrap=10)
    by = [lds(TRAKScorer(lam=lam).fit(phi).scores(q), masks, F, 10)[0] for lam in grid]
    np.testing.assert_allclose(res["lds_by_lambda"], by)
    assert res["paper"]["lambda"] == grid[int(np.argmax(by))]
    assert set(res["honest"]["lambdas"]) <= set(grid)
