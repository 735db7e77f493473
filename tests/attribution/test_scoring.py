import numpy as np
import pytest
import torch

from dtrak_core.attribution.scoring import SpectralTRAK, TRAKScorer, default_lambda, ensemble_scores, top_k


def naive_scores(phi_q, phi, lam):
    """The published formula, dense, no tricks: Phi_q (Phi (Phi^T Phi + lam I)^-1)^T."""
    k = phi.shape[1]
    inv = np.linalg.inv(phi.T @ phi + lam * np.eye(k))
    return phi_q @ (phi @ inv).T


@pytest.mark.parametrize("n,k", [(40, 10), (10, 40), (25, 25)])
def test_scores_equal_closed_form(n, k):
    rng = np.random.default_rng(0)
    phi = rng.normal(size=(n, k)).astype(np.float32)
    q = rng.normal(size=(3, k)).astype(np.float32)
    lam = 0.7
    got = TRAKScorer(lam=lam).fit(phi).scores(q)
    np.testing.assert_allclose(got, naive_scores(q.astype(np.float64), phi.astype(np.float64), lam), rtol=1e-9, atol=1e-12)


def test_default_lambda_rule_and_validation():
    phi = np.ones((4, 9), dtype=np.float32)
    assert default_lambda(phi) == pytest.approx(0.1 * 9)
    assert TRAKScorer().fit(phi).lam_ == pytest.approx(0.9)
    with pytest.raises(ValueError, match="lambda"):
        TRAKScorer(lam=0.0).fit(phi)
    with pytest.raises(ValueError, match="dim"):
        TRAKScorer(lam=1.0).fit(phi).scores(np.ones((1, 8)))


def test_scorers_store_arguments_and_fit_does_the_work():
    phi = np.random.default_rng(1).normal(size=(12, 5))
    scorer = TRAKScorer(lam=-1.0)  # checked by fit, not by the constructor
    assert scorer.lam == -1.0 and not hasattr(scorer, "weights_")
    with pytest.raises(ValueError, match="not fitted"):
        scorer.scores(phi[:2])
    with pytest.raises(ValueError, match="lambda must be positive"):
        scorer.fit(phi)
    rule = TRAKScorer()
    assert rule.fit(phi) is rule and rule.lam is None and rule.lam_ == pytest.approx(default_lambda(phi))
    assert rule.weights_.shape == (5, 12) and rule.train_features_.shape == (12, 5)
    spectral = SpectralTRAK().fit(phi)
    for lam in (0.05, rule.lam_, 30.0):
        np.testing.assert_allclose(spectral.scores(phi[:3], lam), TRAKScorer(lam).fit(phi).scores(phi[:3]), rtol=1e-8,
                                   atol=1e-12)


def test_device_is_checked_by_fit_and_cpu_is_the_default():
    phi = np.random.default_rng(2).normal(size=(20, 6))
    plain = TRAKScorer(lam=1.0).fit(phi)
    on_cpu = TRAKScorer(lam=1.0, device="cpu").fit(phi)
    np.testing.assert_array_equal(on_cpu.scores(phi[:2]), plain.scores(phi[:2]))
    assert on_cpu.weights_.device.type == "cpu" and on_cpu.scores(phi[:2]).dtype == np.float64
    with pytest.raises(ValueError, match="unknown device"):
        TRAKScorer(device="tpu").fit(phi)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            TRAKScorer(device="cuda").fit(phi)


def test_top_k_and_ensembles():
    s = np.array([0.1, 3.0, -2.0, 0.5, -0.1])
    pro, opp = top_k(s, 2)
    assert pro.tolist() == [1, 3] and opp.tolist() == [2, 4]
    np.testing.assert_allclose(ensemble_scores([np.ones((2, 3)), 3 * np.ones((2, 3))]), 2 * np.ones((2, 3)))
    with pytest.raises(ValueError):
        ensemble_scores([np.ones((2, 3)), np.ones((3, 2))])
