"""Diffusion Attribution Score (DAS).

Lin, Tao, Dong and Xu, "Diffusion Attribution Score: Evaluating Training Data Influence in
Diffusion Models" (ICLR 2025; public code Jinxu-Lin/DAS, built on the D-TRAK code).

DAS scores a training sample z_i by how much removing it changes the model's *predicted noise* at
a query x, rather than a loss (the KL between the two models' Gaussian reverse steps is
proportional to it):

    DAS(x, z_i) = E_t || eps_theta(x_t, t) - eps_theta\\i(x_t, t) ||^2.

Linearising eps_theta in the parameters and taking one Newton step on the linearised training
objective (least squares on the noise) gives theta\\i - theta ~ -(J^T J + lam I)^-1 J_i^T r_i, with
J the stacked Jacobians of the training outputs and r_i = eps - eps_theta(z_i) the residual, so

    DAS(x, z_i) ~ E_t || J_t(x) (J^T J + lam I)^-1 J(z_i)^T r(z_i) ||^2.

The published speed-ups, as the public code applies them: the output is compressed to one number
(the mean of the predicted noise, so J_t(x) becomes the gradient of `avg`), the Jacobian is averaged
over K timesteps (optionally each timestep's gradient at unit norm: `exact.GradientSetting.
normalize_timesteps`), JL-projected, and the residual is summarised by one number per training
sample. With phi these features and Phi the training features:

    das(x, z_i)         = phi(x)^T (Phi^T Phi + lam I)^-1 phi(z_i) * r_i      (the code's "DAS1")
    das-squared(x, z_i) = das(x, z_i)^2                                        (its "DAS1squ", the ||.||^2)

with r_i from the per-timestep training losses MSE_t(z_i): `residual="code"` is the public code's
mean_t rho_t / ||rho||_2 with rho_t = sqrt(MSE_t) (a positive number in [1/T, 1/sqrt(T)]),
`residual="rms"` the plain mean_t rho_t (the residual norm the Newton step scales with).
Higher = stronger proponent, as for TRAK; `das` keeps TRAK's sign, `das-squared` ranks by magnitude.
"""
from __future__ import annotations

import numpy as np
import torch

RESIDUALS = ("code", "rms", "none")
POWERS = {"das": 1, "das-squared": 2}


def residual_weights(losses, kind: str = "code") -> np.ndarray:
    """(N,) DAS residual weights from per-timestep training losses (N, T) (mean-squared errors)."""
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 2 or losses.shape[1] < 1:
        raise ValueError(f"training losses must be (N, T), got {losses.shape}")
    if not np.isfinite(losses).all() or (losses < 0).any():
        raise ValueError("training losses must be finite and non-negative (mean-squared errors)")
    rho = np.sqrt(losses)
    if kind == "code":
        return rho.mean(1) / np.maximum(np.linalg.norm(rho, axis=1), 1e-300)
    if kind == "rms":
        return rho.mean(1)
    if kind == "none":
        return np.ones(len(losses))
    raise ValueError(f"unknown DAS residual {kind!r}; choose one of {list(RESIDUALS)}")


def training_losses(unet, scheduler, images: torch.Tensor, timesteps: torch.Tensor, noise_seed: int = 0) -> np.ndarray:
    """(N, T) eps-prediction MSE of each training image at each timestep, one noise draw per
    (image, timestep) from `noise_seed` (`lds.eps_losses`)."""
    from dtrak_core.evaluation.lds_run import eps_losses

    return eps_losses(unet, scheduler, images, timesteps, (noise_seed,))[0].T


def das_scores(trak_scores, weights, method: str = "das") -> np.ndarray:
    """DAS scores (Q, N) from TRAK-form scores phi_q (Phi^T Phi + lam I)^-1 phi_i of the compressed
    output's features (Q, N) and the residual weights (N,)."""
    if method not in POWERS:
        raise ValueError(f"unknown DAS variant {method!r}; choose one of {sorted(POWERS)}")
    s = np.asarray(trak_scores, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if s.ndim != 2 or w.shape != (s.shape[1],):
        raise ValueError(f"need scores (Q, N) and weights (N,), got {s.shape} and {w.shape}")
    return (s * w) ** POWERS[method]
