"""EK-FAC / K-FAC against the exact Gauss-Newton matrix of a tiny UNet (Jacobians by torch.func)."""
import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev

from dtrak_core.attribution.gradients import trainable_params
from dtrak_core.attribution.kfac import EKFAC
from dtrak_core.model.unet import build_unet


@pytest.fixture(scope="module")
def micro_unet():
    """~2.7K parameters: small enough for a dense GGN."""
    return build_unet(block_out_channels=(2, 4), seed=3).eval()


def jacobians(unet, batches) -> torch.Tensor:
    """(R, D, d) float64 Jacobians of the predicted noise in the parameters, one per curvature row.
    The GGN of the mean-squared-error training loss is (2 / D) mean_r J_r^T J_r."""
    params = {k: v.double() for k, v in trainable_params(unet).items()}
    model = unet.double()
    out = []
    try:
        for xt, t in batches:
            for x, s in zip(xt.double(), t):
                jac = jacrev(lambda p: functional_call(model, p, (x[None], s[None]), {"return_dict": False})[0])(params)
                out.append(torch.cat([j.reshape(x.numel(), -1) for j in jac.values()], dim=1))
    finally:
        unet.float()
    return torch.stack(out)


def ggn_diagonal_in(J: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """diag(Q^T G Q) for G = (2 / D) mean_r J_r^T J_r, without forming G."""
    R, D, _ = J.shape
    return (2.0 / D) * (J.reshape(R * D, -1) @ Q).pow(2).sum(0) / R


def test_ekfac_eigenvalues_are_the_exact_ggn_diagonal_in_its_eigenbasis(micro_unet, scheduler, digits, one_thread):
    images = digits.images[:2]
    ekfac = EKFAC(samples=2, fisher="exact", batch_size=2, seed=5).fit(micro_unet, scheduler, images)
    d = ekfac.dim_
    Q = ekfac.rotate(torch.eye(d)).double()  # row j = e_j Q, i.e. the basis itself
    assert torch.allclose(Q.T @ Q, torch.eye(d, dtype=torch.float64), atol=1e-4)  # orthogonal
    J = jacobians(micro_unet, ekfac.curvature_rows(scheduler, images)[1])  # the correction pass's rows
    want = ggn_diagonal_in(J, Q)
    got = ekfac.eigenvalues_.double()
    # Kronecker layers exactly; GroupNorm layers keep the exact GGN's own diagonal (the basis there is I)
    assert torch.allclose(got, want, rtol=2e-3, atol=1e-6 * float(want.abs().max()))


def test_kfac_block_of_a_linear_layer_is_exact_for_one_row(micro_unet, scheduler, digits, one_thread):
    images = digits.images[:1]
    kfac = EKFAC(samples=1, fisher="exact", correct_eigenvalues=False, batch_size=1, seed=2)
    kfac.fit(micro_unet, scheduler, images)
    J = jacobians(micro_unet, kfac.curvature_rows(scheduler, images)[0])  # one row: (1, D, d)
    checked = 0
    for layer in kfac.layers_:
        if layer.kind != "kron" or len(kfac.A_[layer.name]) != layer.inp or "time_emb" not in layer.name:
            continue
        (w0, _, wshape), (b0, _, _) = layer.slices
        idx = [w0 + o * wshape[1] + i if i < wshape[1] else b0 + o for o in range(layer.out) for i in range(layer.inp)]
        block = (2.0 / J.shape[1]) * J[0][:, idx].T @ J[0][:, idx]
        if float(block.abs().max()) < 1e-8:  # a time shift that a one-channel GroupNorm group removes: no gradient
            continue
        approx = torch.kron(kfac.S_[layer.name], kfac.A_[layer.name])
        assert torch.allclose(approx, block, rtol=1e-3, atol=1e-5 * float(block.abs().max())), layer.name
        checked += 1
    assert checked >= 1


def test_precondition_is_the_damped_inverse_and_scores_use_it(micro_unet, scheduler, digits, one_thread):
    ekfac = EKFAC(samples=2, batch_size=4, seed=1).fit(micro_unet, scheduler, digits.images[:4])
    d = ekfac.dim_
    Q = ekfac.rotate(torch.eye(d)).double()
    lam = 0.1 * float(ekfac.eigenvalues_.mean())
    v = torch.randn(3, d, generator=torch.Generator().manual_seed(0))
    # (Q diag(Lambda) Q^T + lam I)^-1 v, Q orthogonal
    want = ((v.double() @ Q) / (ekfac.eigenvalues_.double() + lam)) @ Q.T
    got = ekfac.precondition(v, lam).double()
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))
    train = torch.randn(5, d, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(ekfac.scores(v, train, lam), (want @ train.double().T).numpy(), rtol=2e-3, atol=1e-6)
    assert torch.allclose(ekfac.unrotate(ekfac.rotate(v)), v, atol=1e-5)


def test_bad_inputs_are_refused(micro_unet, scheduler, digits):
    with pytest.raises(ValueError, match="fisher"):
        EKFAC(fisher="empirical").fit(micro_unet, scheduler, digits.images[:1])
    with pytest.raises(ValueError, match="fit the EKFAC first"):
        EKFAC().rotate(torch.zeros(1, 3))
    ekfac = EKFAC(samples=1, batch_size=2).fit(micro_unet, scheduler, digits.images[:2])
    with pytest.raises(ValueError, match="flat gradients"):
        ekfac.rotate(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="damping"):
        ekfac.precondition(torch.zeros(1, ekfac.dim_), 0.0)
