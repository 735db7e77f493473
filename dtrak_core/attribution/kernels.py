"""Model-free attribution: what a similarity of raw inputs alone predicts, the bar a method that
uses the model has to clear.

Kernel ridge regression on the training inputs, in TRAK's form with a kernel in place of the
projected gradients' inner product (TRAK in its dual form is this with k(x, y) = <phi(x), phi(y)>):

    scores(q) = k(q, X) (K + lam I)^-1          (Q, N),   K = k(X, X)

| kernel  | k(x, y)                                                                         |
|---------|---------------------------------------------------------------------------------|
| linear  | <x, y>: the TRAK formula on raw inputs                                          |
| rbf     | exp(-gamma ||x - y||^2 / d), d the input dimension (gamma is per-pixel)         |
| arccos  | the order-1 arc-cosine kernel (Cho & Saul 2009), an infinitely wide ReLU layer: |
|         | ||x|| ||y|| (sin t + (pi - t) cos t) / pi, t the angle between x and y          |

and the empirical optimal denoiser (`optimal_denoiser_scores`): the closed-form denoiser of the
training set at noise level t averages the training images with posterior weights
softmax_n(-||x_t - sqrt(abar_t) x_n||^2 / (2 (1 - abar_t))); a training image's score for a query
is its weight averaged over timesteps and noise draws, the share of the query that the ideal model
would take from it. A diffusion model that memorises its training set is this denoiser.

Each kernel's eigendecomposition is computed once (`KernelRidge.fit`); every lambda then costs a
matrix product, so lambda and gamma are tuned on a grid as TRAK's lambda is.
"""
from __future__ import annotations

import math

import numpy as np
import torch

KERNELS = ("linear", "rbf", "arccos")
DEFAULT_GAMMA = 1.0  # per-pixel: exp(-mean squared pixel difference); the median distance heuristic gives ~0.5-2
DEFAULT_RELATIVE_LAMBDA = 0.1  # as TRAK's rule: 0.1 x the mean of K's diagonal


def _flat(x) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    return x.detach().reshape(len(x), -1).to(torch.float64)


def kernel(a, b, name: str, gamma: float = DEFAULT_GAMMA) -> torch.Tensor:
    """k(a_i, b_j) (A, B) float64 for inputs a (A, ...) and b (B, ...), flattened."""
    a, b = _flat(a), _flat(b)
    if name == "linear":
        return a @ b.T
    if name == "rbf":
        d2 = (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None] - 2 * a @ b.T).clamp_min(0)
        return torch.exp(-gamma * d2 / a.shape[1])
    if name == "arccos":
        na, nb = a.norm(dim=1), b.norm(dim=1)
        cos = ((a @ b.T) / (na[:, None] * nb[None]).clamp_min(1e-12)).clamp(-1, 1)
        t = torch.arccos(cos)
        return na[:, None] * nb[None] * (torch.sin(t) + (math.pi - t) * cos) / math.pi
    raise ValueError(f"unknown kernel {name!r}; one of {', '.join(KERNELS)}")


def mean_diagonal(train, name: str) -> float:
    """mean_n k(x_n, x_n) of inputs (N, ...): the scale of a kernel's lambda (`KernelRidge.default_lambda`
    is 0.1 x it); an RBF kernel's diagonal is 1 at any gamma."""
    x = _flat(train)
    if name == "rbf":
        return 1.0
    if name in ("linear", "arccos"):  # both k(x, x) = ||x||^2
        return float(x.pow(2).sum(1).mean())
    raise ValueError(f"unknown kernel {name!r}; one of {', '.join(KERNELS)}")


class KernelRidge:
    """Kernel ridge attribution scores, fitted once for every lambda.

        ridge = KernelRidge("rbf", gamma=1.0).fit(train_images)     # (N, ...) any shape per image
        scores = ridge.scores(query_images, lam)                     # (Q, N) float64
        ridge.default_lambda                                         # 0.1 x mean(diag K)
    """

    def __init__(self, name: str, gamma: float = DEFAULT_GAMMA):
        if name not in KERNELS:
            raise ValueError(f"unknown kernel {name!r}; one of {', '.join(KERNELS)}")
        self.name, self.gamma = name, float(gamma)

    def fit(self, train) -> "KernelRidge":
        self.train_ = _flat(train)
        K = kernel(self.train_, self.train_, self.name, self.gamma)
        self.eigenvalues_, self.eigenvectors_ = torch.linalg.eigh((K + K.T) / 2)
        self.eigenvalues_ = self.eigenvalues_.clamp_min(0)  # rounding can leave tiny negatives
        self.default_lambda = DEFAULT_RELATIVE_LAMBDA * float(torch.diagonal(K).mean())
        return self

    def project(self, queries) -> torch.Tensor:
        """k(q, X) V (Q, N): the queries in the kernel's eigenbasis (reused across lambdas)."""
        return kernel(queries, self.train_, self.name, self.gamma) @ self.eigenvectors_

    def scores_from_projection(self, projected: torch.Tensor, lam: float) -> np.ndarray:
        if not lam > 0:
            raise ValueError(f"lambda must be > 0, got {lam}")
        return ((projected / (self.eigenvalues_ + lam)) @ self.eigenvectors_.T).numpy()

    def scores(self, queries, lam: float | None = None) -> np.ndarray:
        """(Q, N) scores of queries (Q, ...) at lam (None: `default_lambda`)."""
        return self.scores_from_projection(self.project(queries), self.default_lambda if lam is None else lam)


def optimal_denoiser_scores(queries, train, alphas_cumprod, timesteps=None, noise_draws: int = 4,
                            seed: int = 0) -> np.ndarray:
    """(Q, N) posterior weights of the training images under the empirical optimal denoiser, averaged
    over `timesteps` (default: 10 evenly spaced over the schedule) and `noise_draws` fixed noise
    draws per timestep (common random numbers: the same noise for every query position).

    queries (Q, ...), train (N, ...): images in the model's input range; alphas_cumprod (T,): the
    scheduler's cumulative alphas. Each row sums to 1: a probability over training images.
    """
    q, x = _flat(queries), _flat(train)
    abar = torch.as_tensor(np.asarray(alphas_cumprod), dtype=torch.float64)
    if timesteps is None:
        T = len(abar)
        timesteps = [int(T * (i + 0.5) / 10) for i in range(10)]
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(len(q), len(x), dtype=torch.float64)
    x2 = x.pow(2).sum(1)
    for t in timesteps:
        a = float(abar[int(t)])
        for _ in range(noise_draws):
            noise = torch.randn(q.shape[1], generator=gen, dtype=torch.float64)
            xt = math.sqrt(a) * q + math.sqrt(1 - a) * noise  # the same draw for every query
            d2 = xt.pow(2).sum(1)[:, None] + a * x2[None] - 2 * math.sqrt(a) * xt @ x.T
            out += torch.softmax(-d2 / (2 * (1 - a)), dim=1)
    return (out / (len(timesteps) * noise_draws)).numpy()
