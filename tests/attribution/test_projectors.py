import math

import pytest
import torch

from dtrak_core.attribution.projectors import TILE, DenseGaussianProjector, SparseJLProjector, make_projector


def test_dense_same_output_for_any_batch_or_memory_bound():
    d, k = 2 * TILE + 77, TILE + 5
    x = torch.randn(9, d, generator=torch.Generator().manual_seed(0))
    small = DenseGaussianProjector(d, k, seed=3, max_bytes=TILE * TILE * 4)
    big = DenseGaussianProjector(d, k, seed=3, max_bytes=1 << 30)
    whole = small.project(x)
    torch.testing.assert_close(big.project(x), whole, rtol=1e-5, atol=1e-5)
    pieces = torch.cat([small.project(x[:4]), small.project(x[4:5]), small.project(x[5:])])
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-5)
    # and it is the dense formula x @ P
    torch.testing.assert_close(whole, x @ small.matrix(), rtol=1e-4, atol=1e-4)


def test_dense_seed_changes_matrix():
    a = DenseGaussianProjector(100, 10, seed=1).matrix()
    b = DenseGaussianProjector(100, 10, seed=2).matrix()
    assert not torch.equal(a, b)
    assert a.shape == (100, 10)


@pytest.mark.parametrize("proj_cls", [DenseGaussianProjector, SparseJLProjector])
def test_inner_products_preserved_within_jl_bounds(proj_cls):
    d, k, n = 3000, 2048, 20
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
    y = proj_cls(d, k, seed=0).project(x)
    gx = x @ x.T
    gy = y @ y.T
    norms = gx.diagonal().sqrt()
    rel = (gy - gx).abs() / torch.outer(norms, norms)
    # JL: |<Px, Py> - <x, y>| <= eps ||x|| ||y|| with eps ~ a few / sqrt(k)
    assert rel.max().item() < 6 / math.sqrt(k)
    assert rel.mean().item() < 1.5 / math.sqrt(k)


def test_sparse_matches_dense_matrix_exactly():
    d, k = 1000, 64
    p = SparseJLProjector(d, k, seed=5, c=4)
    m = p.matrix()
    # c = 4 -> entries are exactly +-0.5; with small integer inputs every sum is exact in float32.
    assert set(m.unique().tolist()) == {-0.5, 0.0, 0.5}
    assert ((m != 0).sum(1) == 4).all()  # each coordinate goes to exactly c outputs, one per block
    x = torch.randint(-8, 9, (7, d), generator=torch.Generator().manual_seed(2)).float()
    assert torch.equal(p.project(x), x @ m)


def test_projector_errors():
    with pytest.raises(ValueError, match="unknown projector"):
        make_projector("fourier", 10, 4)
    with pytest.raises(ValueError, match="expected"):
        SparseJLProjector(10, 4).project(torch.zeros(2, 11))
    with pytest.raises(ValueError, match="divide"):
        SparseJLProjector(10, 6, c=4)
