"""How each baseline of the paper's table scores a query; the registry (`methods`) names them.

Score of training sample n for a query q (higher = stronger proponent, as for TRAK):

| name            | score                                                                       |
|-----------------|-----------------------------------------------------------------------------|
| pixel-dot       | <x_q, x_n> over flattened pixels in [-1, 1]                                 |
| pixel-cosine    | cos(x_q, x_n)                                                               |
| clip-dot        | <e_q, e_n>, e = CLIP ViT-B/32 image embedding (see clip_encoder)            |
| clip-cosine     | cos(e_q, e_n)                                                               |
| gradient-dot    | <phi_q, phi_n>, phi = projected loss gradient at the final checkpoint       |
| gradient-cosine | cos(phi_q, phi_n)  (Charpiat et al. 2019)                                   |
| tracin          | sum_c <phi_c(q), phi_c(n)> over saved checkpoints c, no lr weighting         |
|                 | (TracInCP, Pruthi et al. 2020)                                              |
| gas             | sum_c cos(phi_c(q), phi_c(n))  (Hammoudeh & Lowd 2022)                      |
| relative-ip     | TRAK score / ||(Phi^T Phi + lam I)^-1 phi_n||  (Barshan et al. 2020)        |
| renorm-ip       | TRAK score / ||phi_n||                                                      |
| journey-trak    | TRAK score of the loss gradient averaged along the query's DDIM trajectory: |
|                 | at each step the predicted x0, re-noised at that step's timestep            |
|                 | (Georgiev et al. 2023; generated samples only, needs their seeds)           |
| pixel-nn        | -||x_q - x_n||^2: nearest neighbours in pixel space                         |
| pixel-trak      | the TRAK formula on raw pixels: linear kernel ridge, k(q, X) (K + lam I)^-1 |
| pixel-rbf       | RBF kernel ridge on raw pixels (`kernels`), gamma and lambda tuned          |
| pixel-arccos    | arc-cosine kernel ridge on raw pixels (an infinitely wide ReLU layer)       |
| optimal-denoiser| the training image's posterior weight in the empirical optimal denoiser,    |
|                 | averaged over noise levels (what a model that memorised its data would use) |

`latent-*` (text-to-image folders): the same model-free scores on the VAE latents the UNet is
trained on instead of the pixels.

The last five use no model at all: they are the strong nonparametric bar (`kernels`). A method is
only worth its margin over them. Their lambda (and the RBF's gamma) come from the folder's
manifest when tuned (`tuned_lambda[<name>]`, `lds tune-lambda`), else from data-free rules.

"Loss gradient" features are the attributor's `loss` (TRAK) store and featurizer, so gradient-*,
relative-ip, renorm-ip and journey-trak share the TRAK projection and lambda. TracInCP needs the
intermediate checkpoints of the model's own training run and their stores (see `tracin`).

Each scorer is `(method, inputs, images, seeds, K) -> (Q, N) float64`: `method` is the registry's
`Method` (its `kind` picks dot or cosine, relative or renorm; its `store` the output function),
`inputs` the attributor's `inputs.MethodInputs`, images (Q, C, H, W) in [-1, 1].
"""
from __future__ import annotations

import numpy as np

from dtrak_core.attribution.kernels import KernelRidge, optimal_denoiser_scores
from dtrak_core.attribution.similarity import ip_norms, similarity
from dtrak_core.errors import MethodUnavailable


def inputs_similarity(method, inputs, images, seeds, K) -> np.ndarray:
    query, train = inputs.inputs_in(method.space, images)
    return similarity(query.flatten(1), train.flatten(1), method.kind)


def clip(method, inputs, images, seeds, K) -> np.ndarray:
    return similarity(inputs.clip()(images), inputs.clip_train(), method.kind)


def gradients(method, inputs, images, seeds, K) -> np.ndarray:
    query, train = inputs.query_features(images, method.store, K), inputs.train_features(method.store, K)
    return similarity(query, train, method.kind)


def tracin(method, inputs, images, seeds, K) -> np.ndarray:
    return sum(similarity(q, c.train_features, method.kind)
               for q, c in zip(inputs.tracin_query_features(images), inputs.tracin()))


def inner_product(method, inputs, images, seeds, K) -> np.ndarray:
    """TRAK scores divided by a per-training-sample norm (`similarity.ip_norms`)."""
    setting, _ = inputs.store(method.store, K)
    scorer = inputs.attributor.scorer(method.store, setting.K)
    norms = inputs.cached((method.kind, setting, scorer.lam_), lambda: ip_norms(scorer, method.kind))
    return scorer.scores(inputs.query_features(images, method.store, K)) / norms


def journey(method, inputs, images, seeds, K) -> np.ndarray:
    if seeds is None:
        raise MethodUnavailable(f"{method.label} attributes generated samples only: pass the generation seeds")
    setting, _ = inputs.store(method.store, K)
    return inputs.attributor.scorer(method.store, setting.K).scores(inputs.journey(setting)(seeds, images))


def nearest(method, inputs, images, seeds, K) -> np.ndarray:
    q, x = (t.flatten(1).double() for t in inputs.inputs_in(method.space, images))
    return -(q.pow(2).sum(1)[:, None] + x.pow(2).sum(1)[None] - 2 * q @ x.T).numpy()


def hyperparameters(method, attributor) -> dict:
    """{"lambda": ..., "gamma": ...} of a kernel baseline: tuned in the folder's manifest, else None each."""
    entry = getattr(attributor, "tuned_params", {}).get(method.name, {})
    return {"lambda": entry.get("lambda"), "gamma": entry.get("gamma")}


def kernel_ridge(method, inputs, images, seeds, K) -> np.ndarray:
    """At the folder's tuned (lambda, gamma) (not `attribute --lambda`: a TRAK lambda is on another scale)."""
    return kernel_ridge_at(method, inputs, images, hyperparameters(method, inputs.attributor))


def kernel_ridge_at(method, inputs, images, params: dict) -> np.ndarray:
    """Kernel ridge scores (Q, N) at `params` {"lambda", "gamma"} (None each: the data-free rules,
    `kernels.DEFAULT_GAMMA` and 0.1 x the kernel's mean diagonal), as the counterfactual ranks at
    D-TRAK's data-free lambda."""
    lam = params.get("lambda")
    gamma = params["gamma"] if params.get("gamma") is not None else KernelRidge(method.kind).gamma
    query, train = inputs.inputs_in(method.space, images)
    ridge = inputs.cached(("kernel", method.space, method.kind, gamma), lambda: KernelRidge(method.kind, gamma).fit(train))
    return ridge.scores(query, lam)


def optimal_denoiser(method, inputs, images, seeds, K) -> np.ndarray:
    query, train = inputs.inputs_in(method.space, images)
    return optimal_denoiser_scores(query, train, inputs.attributor.scheduler.alphas_cumprod)
