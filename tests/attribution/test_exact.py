"""Exact (kernel) TRAK: Gram blocks, dual scores against the primal TRAKScorer, projected kernels,
and the resumable full-gradient store."""
import time

import numpy as np
import pytest
import torch

from dtrak_core.attribution.exact import (
    GradientSetting,
    KernelTRAK,
    TimestepGradients,
    exact_scores,
    full_gradient_store,
    gram,
    projected_kernels,
)
from dtrak_core.attribution.gradients import GradientFeaturizer
from dtrak_core.attribution.projectors import SparseJLProjector
from dtrak_core.attribution.scoring import TRAKScorer
from dtrak_core.errors import Cancelled


def test_gram_in_blocks_equals_the_dense_product():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 50)).astype(np.float32), rng.normal(size=(4, 50)).astype(np.float32)
    np.testing.assert_allclose(gram(x, y, block=8), x.astype(np.float64) @ y.T.astype(np.float64), rtol=1e-5, atol=1e-5)
    g = gram(x, block=13)
    np.testing.assert_allclose(g, x.astype(np.float64) @ x.T.astype(np.float64), rtol=1e-5, atol=1e-5)
    assert np.array_equal(g, g.T)
    with pytest.raises(ValueError, match="same number of columns"):
        gram(x, y[:, :10])


def test_kernel_trak_equals_the_primal_scorer_and_its_leverages():
    rng = np.random.default_rng(1)
    train, queries = rng.normal(size=(6, 40)), rng.normal(size=(3, 40))
    lam = 0.3
    want = TRAKScorer(lam=lam).fit(train).scores(queries)  # k > N: TRAKScorer's dual; primal below
    primal = queries @ np.linalg.solve(train.T @ train + lam * np.eye(40), train.T)
    np.testing.assert_allclose(want, primal, rtol=1e-8, atol=1e-10)
    kt = KernelTRAK().fit(train @ train.T)
    np.testing.assert_allclose(kt.scores(queries @ train.T, lam), primal, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(exact_scores(train.astype(np.float32), queries.astype(np.float32), lam, block=16),
                               primal, rtol=1e-4, atol=1e-5)
    masks = rng.random((5, 6)) < 0.5
    np.testing.assert_allclose(kt.subset_sums(masks, kt.project(queries @ train.T), lam), masks @ primal.T, atol=1e-10)
    w = rng.random(6)
    np.testing.assert_allclose(kt.subset_sums(masks, kt.project(queries @ train.T), lam, w), masks @ (primal * w).T,
                               atol=1e-10)
    hat = train @ np.linalg.solve(train.T @ train + lam * np.eye(40), train.T)
    np.testing.assert_allclose(kt.leverages(lam), np.diag(hat), rtol=1e-8)
    with pytest.raises(ValueError, match="square"):
        KernelTRAK().fit(np.ones((2, 3)))
    with pytest.raises(ValueError, match="lambda"):
        kt.scores(queries @ train.T, 0.0)
    with pytest.raises(ValueError, match="cross Gram"):
        kt.project(np.ones((2, 5)))


def test_projected_kernels_are_the_kernels_of_projected_features():
    rng = np.random.default_rng(2)
    train, q = rng.normal(size=(9, 300)).astype(np.float32), rng.normal(size=(4, 300)).astype(np.float32)
    proj = SparseJLProjector(300, 64, seed=3)
    out = projected_kernels(train, {"q": q}, proj, rows=4)
    pt, pq = proj.project(torch.from_numpy(train)).double(), proj.project(torch.from_numpy(q)).double()
    np.testing.assert_allclose(out["train"], (pt @ pt.T).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["q"], (pq @ pt.T).numpy(), rtol=1e-4, atol=1e-4)


def test_unnormalised_timestep_gradients_are_the_gradient_featurizer(tiny_unet, scheduler, digits, one_thread):
    x = digits.images[:3]
    got = TimestepGradients(tiny_unet, scheduler, GradientSetting("loss", 4))(x)
    want = GradientFeaturizer(tiny_unet, scheduler, "loss", 4)(x)
    assert torch.allclose(got, want)
    assert GradientSetting("d-trak", 10, True).slug == "square-K10-unit-full"


def test_full_gradient_store_resumes_after_a_deadline(tmp_path, tiny_unet, scheduler, digits, one_thread):
    images = digits.images[:6]
    setting = GradientSetting("square", 2)
    path = str(tmp_path / "g")
    with pytest.raises(Cancelled, match="run again"):
        full_gradient_store(path, tiny_unet, scheduler, setting, images, "fp", "ck", batch_size=2, slice_size=2,
                            deadline=time.monotonic() - 1)  # past already: stops before the first slice
    store = full_gradient_store(path, tiny_unet, scheduler, setting, images, "fp", "ck", batch_size=2, slice_size=2)
    want = TimestepGradients(tiny_unet, scheduler, setting)(images).numpy()
    np.testing.assert_allclose(store.features(), want, rtol=1e-5, atol=1e-7)
    assert store.metadata["projector"] == "full-gradient" and store.metadata["k"] == want.shape[1]
    with pytest.raises(ValueError, match="built for"):
        full_gradient_store(path, tiny_unet, scheduler, GradientSetting("loss", 2), images, "fp", "ck", slice_size=2)
