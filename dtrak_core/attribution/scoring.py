"""TRAK / D-TRAK scores from projected features.

    scores = Phi_q (Phi_train (Phi^T Phi + lambda I)^-1)^T          (Q, N)

with Phi = Phi_train (N, k). When k > N the same matrix is computed in the dual (Woodbury) form
Phi_q Phi^T (Phi Phi^T + lambda I)^-1, which solves an N x N system instead of a k x k one. As in
the published code there is no Q term and no per-example normalisation. A higher score means a
stronger proponent.

Default lambda (chosen without looking at any evaluation set): `DEFAULT_RELATIVE_LAMBDA` times the
mean squared feature norm, trace(Phi Phi^T) / N, so the regulariser scales with the features
whatever the output function, K or k.
"""
from __future__ import annotations

import numpy as np
import torch

DEFAULT_RELATIVE_LAMBDA = 0.1


def _float64(x) -> torch.Tensor:
    """A float64 copy of a tensor or array (stores are read-only memmaps, so always copy)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64, copy=True)
    return torch.from_numpy(np.array(x, dtype=np.float64))


def default_lambda(train_features, relative: float = DEFAULT_RELATIVE_LAMBDA) -> float:
    phi = _float64(train_features)
    return float(relative * phi.pow(2).sum(1).mean())


class TRAKScorer:
    """Fit once on the training features, then score any number of query features."""

    def __init__(self, train_features, lam: float | None = None, relative_lambda: float = DEFAULT_RELATIVE_LAMBDA):
        phi = _float64(train_features)  # (N, k)
        if phi.ndim != 2:
            raise ValueError(f"train features must be (N, k), got {tuple(phi.shape)}")
        self.lam = default_lambda(phi, relative_lambda) if lam is None else float(lam)
        if not self.lam > 0:
            raise ValueError(f"lambda must be positive, got {self.lam}")
        n, k = phi.shape
        if k > n:  # dual: X = Phi^T (Phi Phi^T + lam I)^-1, (k, N)
            gram = phi @ phi.T
            gram.diagonal().add_(self.lam)
            self.weights = torch.linalg.solve(gram, phi).T
        else:  # primal: X = (Phi^T Phi + lam I)^-1 Phi^T, (k, N)
            cov = phi.T @ phi
            cov.diagonal().add_(self.lam)
            self.weights = torch.linalg.solve(cov, phi.T)
        self.train_features = phi

    @property
    def n(self) -> int:
        return self.weights.shape[1]

    def scores(self, query_features) -> np.ndarray:
        """(Q, k) -> (Q, N) float64."""
        q = _float64(query_features)
        if q.ndim == 1:
            q = q[None]
        if q.shape[1] != self.weights.shape[0]:
            raise ValueError(f"query features have dim {q.shape[1]}, the store has k={self.weights.shape[0]}")
        return (q @ self.weights).numpy()


class SpectralTRAK:
    """TRAK scores for any number of lambdas from one thin SVD of the training features.

    With Phi = U diag(s) V^T, both the primal and the dual form equal V diag(s / (s^2 + lam)) U^T,
    so scores(q, lam) = (q V) diag(s / (s^2 + lam)) U^T, and the LDS's sums of scores over subsets,
    masks @ scores^T, cost O(M r Q) per lambda once masks @ U and q V are known (r = min(N, k)).
    """

    def __init__(self, train_features):
        phi = _float64(train_features)
        if phi.ndim != 2:
            raise ValueError(f"train features must be (N, k), got {tuple(phi.shape)}")
        self.U, self.s, Vh = torch.linalg.svd(phi, full_matrices=False)
        self.V = Vh.T
        self.train_norms = phi.norm(dim=1)

    def shrink(self, lam: float) -> torch.Tensor:
        if not lam > 0:
            raise ValueError(f"lambda must be positive, got {lam}")
        return self.s / (self.s ** 2 + lam)

    def project(self, query_features) -> torch.Tensor:
        """(Q, k) -> (Q, r): q V, reusable across lambdas."""
        q = _float64(query_features)
        if q.ndim != 2 or q.shape[1] != self.V.shape[0]:
            raise ValueError(f"query features must be (Q, {self.V.shape[0]}), got {tuple(q.shape)}")
        return q @ self.V

    def scores(self, query_features, lam: float) -> np.ndarray:
        return ((self.project(query_features) * self.shrink(lam)) @ self.U.T).numpy()

    def weight_norms(self, lam: float) -> torch.Tensor:
        """(N,) norms of the columns of the score weights, ||(Phi^T Phi + lam I)^-1 phi_n|| (Relative IP)."""
        return ((self.U * self.shrink(lam)) ** 2).sum(1).sqrt()


def top_k(scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(proponents, opponents): indices of the n highest and n lowest scores, strongest first."""
    order = np.argsort(-scores, kind="stable")
    return order[:n], order[::-1][:n]


def ensemble_scores(score_matrices) -> np.ndarray:
    """Average the score matrices of S models (the paper's ensembles)."""
    mats = [np.asarray(m) for m in score_matrices]
    if not mats or any(m.shape != mats[0].shape for m in mats):
        raise ValueError("ensemble needs one or more score matrices of equal shape")
    return np.mean(mats, axis=0)
