import numpy as np
import pytest
import torch

from dtrak_core.attribution.scoring import (
    EnsembleScorer,
    SpectralTRAK,
    TRAKScorer,
    default_lambda,
    ensemble_scores,
    top_k,
)


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


def test_an_ensemble_averages_its_checkpoints_trak_scores():
    rng = np.random.default_rng(3)
    train = [rng.normal(size=(30, 8)).astype(np.float32) for _ in range(2)]  # one (N, k) per checkpoint
    queries = [rng.normal(size=(4, 8)).astype(np.float32) for _ in range(2)]
    # an ensemble of one is that checkpoint's TRAKScorer, bit for bit (lambda given or by the rule)
    for lam in (0.7, None):
        one = EnsembleScorer(lam=lam).fit(train[:1])
        alone = TRAKScorer(lam=lam).fit(train[0])
        np.testing.assert_array_equal(one.scores(queries[:1]), alone.scores(queries[0]))
        assert one.lams_ == [alone.lam_]
    # two: the mean of the two scorers' scores, each from the closed form on its own features
    for lam, lams in ((0.7, (0.7, 0.7)), ([0.5, 2.0], (0.5, 2.0)), (None, [default_lambda(t) for t in train])):
        scorer = EnsembleScorer(lam=lam).fit(train)
        expected = np.mean([naive_scores(q.astype(np.float64), t.astype(np.float64), lam_) for q, t, lam_ in
                            zip(queries, train, lams)], axis=0)
        np.testing.assert_allclose(scorer.scores(queries), expected, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(scorer.lams_, lams)
    stacked = EnsembleScorer(lam=0.7).fit(np.stack(train))  # an (S, N, k) array is S checkpoints
    np.testing.assert_array_equal(stacked.scores(np.stack(queries)), EnsembleScorer(lam=0.7).fit(train).scores(queries))
    assert EnsembleScorer(lam=0.7).fit(train).scores([q[0] for q in queries]).shape == (1, 30)  # one (k,) query each


def test_an_ensemble_says_what_it_needs():
    rng = np.random.default_rng(4)
    train = [rng.normal(size=(30, 8)) for _ in range(2)]
    with pytest.raises(ValueError, match="not fitted"):
        EnsembleScorer().scores([train[0][:1]] * 2)
    with pytest.raises(ValueError, match=r"one feature matrix per checkpoint .* an ensemble of one is \[features\]"):
        EnsembleScorer().fit(train[0])
    with pytest.raises(ValueError, match="one or more checkpoints"):
        EnsembleScorer().fit([])
    with pytest.raises(ValueError, match="same N"):
        EnsembleScorer().fit([train[0], train[1][:20]])
    with pytest.raises(ValueError, match="3 lambdas for 2 checkpoints"):
        EnsembleScorer(lam=[1.0, 2.0, 3.0]).fit(train)
    fitted = EnsembleScorer().fit(train)
    with pytest.raises(ValueError, match="1 query feature matrices for an ensemble of 2"):
        fitted.scores([train[0][:2]])
    with pytest.raises(ValueError, match="single"):
        fitted.scores(train[0][:2])
