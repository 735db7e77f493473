"""Exact TRAK scores from full (unprojected) per-sample gradients, in the dual (kernel) form.

TRAK's score matrix with features G (N, d) and query features G_q (Q, d),

    S = G_q (G^T G + lam I)^-1 G^T = (G_q G^T) (G G^T + lam I)^-1          (Q, N)

needs only two kernels when N << d (1,500 training digits, 159,697 parameters): the training Gram
matrix G G^T (N, N) and the cross Gram G_q G^T (Q, N). A JL projection P (d, k) estimates exactly
these kernels (E[P P^T] = I), so k -> infinity recovers the exact scores; `projected_kernels`
gives the kernels at any k from the same stored gradients, which makes k a measured knob.

- `GradientSetting`, `full_gradient_store`: full per-sample gradients of an output function over
  K timesteps, stored as a resumable `FeatureStore` with k = d columns (float32, N x d x 4 bytes).
- `gram`: X Y^T over column blocks of memmapped matrices, memory bounded by the block, float64 sums.
- `KernelTRAK`: TRAK from the kernels; one eigendecomposition of G G^T serves every lambda.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from dtrak_core.attribution.gradients import GradientFeaturizer, num_features
from dtrak_core.attribution.output_functions import canonical_name
from dtrak_core.attribution.store import FeatureStore
from dtrak_core.errors import Cancelled

FULL_GRADIENT = "full-gradient"  # the `projector` field of a store that holds unprojected gradients


@dataclass(frozen=True)
class GradientSetting:
    output_fn: str = "square"  # output function (see output_functions); 'square' is D-TRAK, 'loss' TRAK
    K: int = 100  # timesteps averaged per sample: t in range(0, 1000, 1000 // K)
    normalize_timesteps: bool = False  # scale each timestep's gradient to unit norm before the mean (DAS code)

    def __post_init__(self):
        object.__setattr__(self, "output_fn", canonical_name(self.output_fn))
        if self.K < 1:
            raise ValueError(f"K must be positive, got {self.K}")

    def to_dict(self) -> dict:
        return {**asdict(self), "projector": FULL_GRADIENT}

    @property
    def slug(self) -> str:
        return f"{self.output_fn.replace('=', '')}-K{self.K}{'-unit' if self.normalize_timesteps else ''}-full"


class TimestepGradients(GradientFeaturizer):
    """Full per-sample gradients (B, d) like `GradientFeaturizer`, optionally with every timestep's
    gradient scaled to unit norm before the mean over timesteps (as the public DAS code does before
    projecting; it equalises the timesteps, whose raw gradient norms differ by orders of magnitude)."""

    def __init__(self, unet, scheduler, setting: GradientSetting):
        # one timestep per pass when normalising: each timestep's gradient must be seen on its own
        super().__init__(unet, scheduler, setting.output_fn, setting.K,
                         timestep_chunk=1 if setting.normalize_timesteps else 25)
        self.normalize = setting.normalize_timesteps

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not self.normalize:
            return super().__call__(images)
        out = torch.zeros(len(images), self.dim)
        for k in range(self.K):
            # this featurizer restricted to timestep k: same weights, noise and timestep as row k
            g = GradientFeaturizer.__call__(self.subset(slice(k, k + 1)), images)
            out += g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return out / self.K


def full_gradient_store(path: str, unet, scheduler, setting: GradientSetting, images: torch.Tensor, dataset: str,
                        checkpoint: str, batch_size: int = 32, slice_size: int = 64, deadline: float | None = None,
                        show_bar: bool = False) -> FeatureStore:
    """The complete store of full gradients (N, d) of `images` at `path`, computed where missing.

    Resumable: slices of `slice_size` rows are written whole. With `deadline` (a `time.monotonic()`
    value) it stops cleanly between slices once the deadline has passed and raises `Cancelled`;
    the same call later continues where it stopped. `dataset` is the images' fingerprint and
    `checkpoint` the model's hash (both go into the store's identity)."""
    identity = {**setting.to_dict(), "checkpoint": checkpoint, "dataset": dataset}
    store = FeatureStore.create(path, identity, len(images), num_features(unet), slice_size=slice_size)
    if store.complete:
        return store
    grads = TimestepGradients(unet, scheduler, setting)

    def featurize(x):
        return torch.cat([grads(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()

    stop = None if deadline is None else (lambda: time.monotonic() > deadline)
    try:
        return store.fill(featurize, images, show_bar=show_bar, should_stop=stop)
    except Cancelled:
        raise Cancelled(f"stopped at the time limit with {int(store.done.sum())} of {len(images)} rows of "
                        f"{path} done; run again to continue") from None


def gram(x, y=None, block: int = 8192) -> np.ndarray:
    """x y^T (float64) for x (n, d) and y (m, d), memmaps welcome: summed over column blocks of
    `block` columns, each product in float32 (BLAS speed) and the sum in float64, so at most
    (n + m) x block values are in memory at once. y=None: the Gram matrix of x (symmetric)."""
    n, d = x.shape
    if y is not None and y.shape[1] != d:
        raise ValueError(f"gram needs the same number of columns, got {x.shape} and {y.shape}")
    out = np.zeros((n, n if y is None else len(y)))
    for c in range(0, d, block):
        a = torch.from_numpy(np.ascontiguousarray(x[:, c:c + block], dtype=np.float32))
        b = a if y is None else torch.from_numpy(np.ascontiguousarray(y[:, c:c + block], dtype=np.float32))
        out += (a @ b.T).double().numpy()
    if y is None:
        out = (out + out.T) / 2  # exactly symmetric for eigh
    return out


def projected_kernels(train, queries: dict, projector, rows: int = 128) -> dict:
    """Kernels of JL-projected features: {"train": P(G) P(G)^T (N, N), name: P(G_q) P(G)^T (Q, N)}
    for full-gradient matrices `train` (N, d) and `queries` {name: (Q, d)}, projected `rows` rows
    at a time (the (N, k) projected features are kept, the full gradients are not)."""
    def project(m):
        return np.concatenate([projector.project(torch.from_numpy(np.array(m[i:i + rows], dtype=np.float32))).numpy()
                               for i in range(0, len(m), rows)])

    phi = project(train)
    out = {"train": gram(phi)}
    for name, q in queries.items():
        out[name] = gram(project(q), phi)
    return out


class KernelTRAK:
    """TRAK scores from kernels: scores(cross, lam) = cross (gram + lam I)^-1, for any lambda.

    `fit(gram)` takes the training Gram matrix G G^T (N, N) and eigendecomposes it once,
    G G^T = U diag(e) U^T, so scores(cross, lam) = (cross U) diag(1 / (e + lam)) U^T; with the exact
    Gram matrix these are the exact (unprojected) TRAK scores, with a projected one the usual
    projected scores (`scoring.TRAKScorer` on the same features gives the same numbers).
    """

    def fit(self, gram_matrix) -> "KernelTRAK":
        K = torch.as_tensor(np.asarray(gram_matrix, dtype=np.float64))
        if K.ndim != 2 or K.shape[0] != K.shape[1]:
            raise ValueError(f"the training Gram matrix must be square (N, N), got {tuple(K.shape)}")
        if not torch.isfinite(K).all():
            raise ValueError("the training Gram matrix has non-finite entries")
        e, U = torch.linalg.eigh(K)  # torch, not numpy: its LAPACK honours torch.set_num_threads
        self.eigenvalues_, self.U_ = e.clamp_min(0.0), U  # a Gram matrix is PSD: negatives are rounding
        return self

    def _check_lam(self, lam: float) -> None:
        if not lam > 0:
            raise ValueError(f"lambda must be positive, got {lam}")

    def project(self, cross) -> torch.Tensor:
        """(Q, N) cross Gram -> (Q, N) float64 in the eigenbasis (cross U), reusable across lambdas."""
        cross = torch.as_tensor(np.asarray(cross, dtype=np.float64))
        if cross.ndim != 2 or cross.shape[1] != len(self.U_):
            raise ValueError(f"the cross Gram matrix must be (Q, {len(self.U_)}), got {tuple(cross.shape)}")
        return cross @ self.U_

    def scores_from(self, projected: torch.Tensor, lam: float) -> np.ndarray:
        """(Q, N) scores from `project(cross)`."""
        self._check_lam(lam)
        return ((projected / (self.eigenvalues_ + lam)) @ self.U_.T).numpy()

    def scores(self, cross, lam: float) -> np.ndarray:
        """(Q, N) scores: higher = stronger proponent."""
        return self.scores_from(self.project(cross), lam)

    def subset_sums(self, masks, projected: torch.Tensor, lam: float, weights=None) -> np.ndarray:
        """masks @ scores^T (M, Q) from `project(cross)`, without forming the scores; `weights` (N,)
        multiplies each training sample's score first (e.g. DAS's residuals)."""
        self._check_lam(lam)
        m = torch.as_tensor(np.asarray(masks, dtype=np.float64))
        if weights is not None:
            m = m * torch.as_tensor(np.asarray(weights, dtype=np.float64))
        return (((m @ self.U_) / (self.eigenvalues_ + lam)) @ projected.T).numpy()

    def leverages(self, lam: float) -> np.ndarray:
        """(N,) h_ii = [G G^T (G G^T + lam I)^-1]_ii, each training sample's leverage."""
        self._check_lam(lam)
        return ((self.U_ ** 2) @ (self.eigenvalues_ / (self.eigenvalues_ + lam))).numpy()


def exact_scores(train, queries, lam: float, block: int = 8192) -> np.ndarray:
    """Exact TRAK scores (Q, N) from full gradients train (N, d) and queries (Q, d) (memmaps welcome)."""
    return KernelTRAK().fit(gram(train, block=block)).scores(gram(queries, train, block=block), lam)
