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

from dtrak_core.devices import resolve_device

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
    """TRAK / D-TRAK scores: fit once on the training features, then score any number of queries.

        scorer = TRAKScorer(lam=None).fit(train_features)    # Phi (N, k), a tensor or an array
        scores = scorer.scores(query_features)               # (Q, k) -> (Q, N) float64

    The constructor only stores its arguments; `fit` checks them and solves the ridge system.

    Args:
        lam: the ridge lambda; None applies the data-free rule `relative_lambda` x the mean squared
            training-feature norm (`default_lambda`).
        relative_lambda: the rule's factor (used when `lam` is None).
        device: where the system is solved and queries are scored ("cpu", the default, or "cuda"),
            in float64 on every device; the scores come back on the CPU.

    Fitted attributes:
        lam_: the lambda used (float, > 0).
        weights_: (k, N) float64 on the CPU, the columns (Phi^T Phi + lam I)^-1 phi_n, so scores = q @ weights_
            (a copy stays on the device for the queries).
        train_features_: (N, k) float64 CPU copy of Phi.
    """

    def __init__(self, lam: float | None = None, relative_lambda: float = DEFAULT_RELATIVE_LAMBDA, device="cpu"):
        self.lam = lam
        self.relative_lambda = relative_lambda
        self.device = device

    def fit(self, train_features) -> "TRAKScorer":
        device = resolve_device(self.device)
        if device.type == "mps":
            raise ValueError("TRAKScorer solves in float64, which mps lacks; use device 'cpu' or 'cuda', or "
                             "ChunkedTRAKScorer(device='mps'), which multiplies in float32")
        phi = _float64(train_features)  # (N, k)
        if phi.ndim != 2:
            raise ValueError(f"train features must be (N, k), got {tuple(phi.shape)}")
        lam = default_lambda(phi, self.relative_lambda) if self.lam is None else float(self.lam)
        if not lam > 0:
            raise ValueError(f"lambda must be positive, got {lam}")
        n, k = phi.shape
        x = phi.to(device)
        if k > n:  # dual: X = Phi^T (Phi Phi^T + lam I)^-1, (k, N)
            gram = x @ x.T
            gram.diagonal().add_(lam)
            weights = torch.linalg.solve(gram, x).T
        else:  # primal: X = (Phi^T Phi + lam I)^-1 Phi^T, (k, N)
            cov = x.T @ x
            cov.diagonal().add_(lam)
            weights = torch.linalg.solve(cov, x.T)
        self._device, self._device_weights = device, weights
        self.lam_, self.weights_, self.train_features_ = lam, weights.cpu(), phi
        return self

    def scores(self, query_features) -> np.ndarray:
        """Query features (Q, k), or one (k,) -> scores (Q, N) float64; higher = stronger proponent."""
        if not hasattr(self, "weights_"):
            raise ValueError("this TRAKScorer is not fitted yet; call fit(train_features) first")
        q = _float64(query_features)
        if q.ndim == 1:
            q = q[None]
        if q.shape[1] != self.weights_.shape[0]:
            raise ValueError(f"query features have dim {q.shape[1]}, the store has k={self.weights_.shape[0]}")
        return (q.to(self._device) @ self._device_weights).cpu().numpy()


class EnsembleScorer:
    """TRAK over an ensemble of checkpoints (TRAK's main accuracy lever): one `TRAKScorer` per
    checkpoint, fitted on that checkpoint's training features; the scores are their mean, as the
    trak package ensembles its models (no Q term, see the module docstring).

        train = featurize_checkpoints(checkpoints, scheduler, setting, train_images)   # [(N, k)] x S
        scorer = EnsembleScorer(lam=None).fit(train)
        scores = scorer.scores(featurize_checkpoints(checkpoints, scheduler, setting, queries))  # [(Q, k)] x S -> (Q, N)

    An ensemble of one checkpoint is exactly that checkpoint's `TRAKScorer`.

    Args:
        lam: the ridge lambda: one for every checkpoint, a sequence of one per checkpoint, or None:
            each checkpoint's data-free rule on its own features (`default_lambda`).
        relative_lambda, device: as `TRAKScorer`'s, for every checkpoint.

    Fitted attributes: scorers_ (S fitted `TRAKScorer`s, in the order given) and lams_ (their lambdas).
    """

    def __init__(self, lam=None, relative_lambda: float = DEFAULT_RELATIVE_LAMBDA, device="cpu"):
        self.lam = lam
        self.relative_lambda = relative_lambda
        self.device = device

    @staticmethod
    def _per_checkpoint(features, what: str) -> list:
        """A list of S feature matrices (a list, a tuple, or an (S, ., k) array or tensor)."""
        if isinstance(features, (torch.Tensor, np.ndarray)) and features.ndim != 3:
            raise ValueError(f"{what} must be one feature matrix per checkpoint (a list, or an (S, ., k) array), got "
                             f"a single {tuple(features.shape)} array; an ensemble of one is [features]")
        features = list(features)
        if not features:
            raise ValueError(f"{what}: an ensemble needs one or more checkpoints")
        return features

    def fit(self, train_features) -> "EnsembleScorer":
        """train_features: one (N, k) matrix per checkpoint (the same N training images, in the same order)."""
        phis = self._per_checkpoint(train_features, "train features")
        lams = list(self.lam) if isinstance(self.lam, (list, tuple, np.ndarray)) else [self.lam] * len(phis)
        if len(lams) != len(phis):
            raise ValueError(f"{len(lams)} lambdas for {len(phis)} checkpoints; give one per checkpoint, or one for all")
        rows = {int(np.shape(phi)[0]) if np.ndim(phi) == 2 else None for phi in phis}
        if len(rows) != 1:
            raise ValueError(f"the checkpoints' train features must all be (N, k) with the same N, got shapes "
                             f"{[tuple(np.shape(phi)) for phi in phis]}")
        self.scorers_ = [TRAKScorer(lam, self.relative_lambda, self.device).fit(phi) for lam, phi in zip(lams, phis)]
        self.lams_ = [scorer.lam_ for scorer in self.scorers_]
        return self

    def scores(self, query_features) -> np.ndarray:
        """Query features, one (Q, k) (or (k,)) per checkpoint in the order of `fit` -> (Q, N) float64,
        the mean of the checkpoints' `TRAKScorer.scores`."""
        if not hasattr(self, "scorers_"):
            raise ValueError("this EnsembleScorer is not fitted yet; call fit(train_features) first")
        qs = self._per_checkpoint(query_features, "query features")
        if len(qs) != len(self.scorers_):
            raise ValueError(f"{len(qs)} query feature matrices for an ensemble of {len(self.scorers_)} checkpoints; "
                             f"give one per checkpoint, in the order of fit")
        return ensemble_scores([scorer.scores(q) for scorer, q in zip(self.scorers_, qs)])


class SpectralTRAK:
    """TRAK scores for any number of lambdas from one thin SVD of the training features.

    With Phi = U diag(s) V^T, both the primal and the dual form equal V diag(s / (s^2 + lam)) U^T,
    so scores(q, lam) = (q V) diag(s / (s^2 + lam)) U^T, and the LDS's sums of scores over subsets,
    masks @ scores^T, cost O(M r Q) per lambda once masks @ U and q V are known (r = min(N, k)).

        spectral = SpectralTRAK().fit(train_features)        # Phi (N, k)
        spectral.scores(query_features, lam)                 # (Q, k) -> (Q, N), = TRAKScorer(lam).fit(Phi)

    Fitted attributes: U_ (N, r), s_ (r,), V_ (k, r) float64 with Phi = U_ diag(s_) V_^T, and
    train_norms_ (N,) the training features' norms.
    """

    def fit(self, train_features) -> "SpectralTRAK":
        phi = _float64(train_features)
        if phi.ndim != 2:
            raise ValueError(f"train features must be (N, k), got {tuple(phi.shape)}")
        self.U_, self.s_, Vh = torch.linalg.svd(phi, full_matrices=False)
        self.V_ = Vh.T
        self.train_norms_ = phi.norm(dim=1)
        return self

    def shrink(self, lam: float) -> torch.Tensor:
        """(r,) s / (s^2 + lam)."""
        if not lam > 0:
            raise ValueError(f"lambda must be positive, got {lam}")
        return self.s_ / (self.s_ ** 2 + lam)

    def project(self, query_features) -> torch.Tensor:
        """(Q, k) -> (Q, r): q V, reusable across lambdas."""
        q = _float64(query_features)
        if q.ndim != 2 or q.shape[1] != self.V_.shape[0]:
            raise ValueError(f"query features must be (Q, {self.V_.shape[0]}), got {tuple(q.shape)}")
        return q @ self.V_

    def scores(self, query_features, lam: float) -> np.ndarray:
        """(Q, k) -> (Q, N) float64 TRAK scores at this lambda."""
        return ((self.project(query_features) * self.shrink(lam)) @ self.U_.T).numpy()

    def weight_norms(self, lam: float) -> torch.Tensor:
        """(N,) norms of the columns of the score weights, ||(Phi^T Phi + lam I)^-1 phi_n|| (Relative IP)."""
        return ((self.U_ * self.shrink(lam)) ** 2).sum(1).sqrt()


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
