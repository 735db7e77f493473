"""Similarity scores between query and training features, and the inner-product normalisations.

- `similarity(query, train, kind)`: dot products ('dot') or cosines ('cosine') of every query
  with every training sample; the pixel, CLIP, gradient, TracInCP and GAS baselines are this over
  their own features.
- `ip_norms(scorer, kind)`: the per-training-sample divisors that turn TRAK scores into
  Relative IP (Barshan et al. 2020) or Renormalized IP scores.
"""
from __future__ import annotations

import numpy as np
import torch


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


def similarity(query, train, kind: str) -> np.ndarray:
    """Scores (Q, N) float64 of queries (Q, D) against training features (N, D), tensors or arrays.

    kind: 'dot' for <q, t>, 'cosine' for cos(q, t) (a zero vector scores 0).
    """
    q = torch.as_tensor(np.asarray(query)).double()
    t = torch.as_tensor(np.asarray(train)).double()
    if q.ndim != 2 or t.ndim != 2 or q.shape[1] != t.shape[1]:
        raise ValueError(f"similarity needs (Q, D) and (N, D), got {tuple(q.shape)} and {tuple(t.shape)}")
    if kind == "cosine":
        q, t = _normalize(q), _normalize(t)
    elif kind != "dot":
        raise ValueError(f"unknown similarity {kind!r}; choose 'dot' or 'cosine'")
    return (q @ t.T).numpy()


def ip_norms(scorer, kind: str) -> np.ndarray:
    """(N,) divisors of a fitted `TRAKScorer`'s scores, one per training sample.

    kind: 'relative' for ||(Phi^T Phi + lam I)^-1 phi_n|| (Relative IP), 'renorm' for ||phi_n||
    (Renormalized IP).
    """
    if kind == "relative":  # columns of scorer.weights_ are (Phi^T Phi + lam I)^-1 phi_n
        return np.maximum(scorer.weights_.norm(dim=0).numpy(), 1e-300)
    if kind == "renorm":
        return np.maximum(scorer.train_features_.norm(dim=1).numpy(), 1e-300)
    raise ValueError(f"kind must be 'relative' or 'renorm', got {kind!r}")
