"""Evidence that tells attribution from look-alikes: every method beside the strong model-free
baselines, scored three ways on one LDS ground truth.

- **signed**: the LDS of the method's scores as they are (the primary number);
- **sharpened**: the LDS of s|s|, which keeps every ranking (proponents, opponents, removals) and
  only concentrates each query's predicted effect on its strongest scores;
- **rank**: the LDS of each query's rank-normalised scores (`lds.rank_normalise`), the same for
  every strictly increasing transform of the scores: what the whole ranking alone predicts;
- **top-1%**: the LDS of an indicator of each query's top 1% (`lds.top_share`, the share fixed in
  advance): also transform-invariant, and about the head of the ranking, the proponents a
  person reads and the counterfactual removes.

A gain that appears under "sharpened" and not under "rank" is bought by the transform, not by a
better ranking; sharpening lifts pixel kernels as much as gradient scores.

Every hyperparameter (TRAK's lambda, the kernels' lambda and bandwidth) is chosen by the same rule,
2-fold cross-fitting over test samples (`lds.lambda_sweep`'s "honest"): picked on one half of the
queries, reported on the other. A `Candidate` is a name, a grid of hyperparameters and a scorer:

    rows = evaluate(candidates, masks, F)        # F: {test set: (M, Q)}; rows: one dict per method
    print(format_table(rows))
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from dtrak_core.attribution import methods
from dtrak_core.attribution.kernels import KernelRidge, optimal_denoiser_scores
from dtrak_core.attribution.scoring import SpectralTRAK
from dtrak_core.attribution.similarity import similarity
from dtrak_core.evaluation.lds import lambda_sweep, rank_normalise, top_share

TRANSFORMS = {"signed": lambda s: s, "sharpened": lambda s: s * np.abs(s), "rank": rank_normalise,
              "top-1%": top_share}
RELATIVE_GRID = tuple(float(f"{m}e{e}") for e in range(-4, 2) for m in (1, 2, 5))  # x mean(diag K)
GAMMA_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # per-pixel RBF bandwidths (8 was the edge)


@dataclass
class Candidate:
    """A method to score: `scores(test_set, params) -> (Q, N)` for each params of `grid`."""

    name: str
    group: str  # "model" (uses the diffusion model) or "model-free"
    scores: Callable[[str, dict], np.ndarray]
    grid: list = field(default_factory=lambda: [{}])
    cost: str = ""  # what it costs, in words (features, fit)
    setup_seconds: float = 0.0


def trak_candidate(name: str, train_features, query_features: dict, grid, cost: str = "") -> Candidate:
    """TRAK scores of projected features (any output function) over a lambda grid."""
    t0 = time.perf_counter()
    spectral = SpectralTRAK().fit(np.asarray(train_features))
    projected = {n: spectral.project(q) for n, q in query_features.items()}
    seconds = time.perf_counter() - t0

    def scores(test_set, params):
        return ((projected[test_set] * spectral.shrink(params["lambda"])) @ spectral.U_.T).numpy()

    return Candidate(name, "model", scores, [{"lambda": lam} for lam in grid], cost, seconds)


def fixed_candidate(name: str, group: str, scores_by_set: dict, cost: str = "") -> Candidate:
    """A method without hyperparameters, its scores given per test set."""
    return Candidate(name, group, lambda test_set, params: scores_by_set[test_set], [{}], cost)


def kernel_candidate(name: str, kernel: str, train_images, test_images: dict, gammas=(1.0,)) -> Candidate:
    """Kernel ridge on raw inputs (`kernels.KernelRidge`) over gamma x relative lambda grids."""
    t0 = time.perf_counter()
    fitted = {}
    for gamma in gammas:
        ridge = KernelRidge(kernel, gamma).fit(train_images)
        fitted[gamma] = (ridge, {n: ridge.project(x) for n, x in test_images.items()})
    seconds = time.perf_counter() - t0

    def scores(test_set, params):
        ridge, projected = fitted[params["gamma"]]
        return ridge.scores_from_projection(projected[test_set], params["relative"] * ridge.default_lambda / 0.1)

    grid = [{"gamma": g, "relative": r} for g in gammas for r in RELATIVE_GRID]
    return Candidate(name, "model-free", scores, grid, f"an N x N kernel, {len(gammas)} bandwidth(s)", seconds)


def pixel_candidates(train_images, test_images: dict, alphas_cumprod) -> list[Candidate]:
    """The model-free baselines: pixel dot / cosine / nearest neighbours, the TRAK formula on pixels,
    RBF and arc-cosine kernel ridge, and the empirical optimal denoiser."""
    x = torch.as_tensor(train_images).flatten(1).double()
    flat = {n: torch.as_tensor(q).flatten(1).double() for n, q in test_images.items()}
    t0 = time.perf_counter()
    denoiser = {n: optimal_denoiser_scores(q, train_images, alphas_cumprod) for n, q in test_images.items()}
    denoiser_seconds = time.perf_counter() - t0
    out = [
        fixed_candidate("pixel-dot", "model-free", {n: similarity(q, x, "dot") for n, q in flat.items()}),
        fixed_candidate("pixel-cosine", "model-free", {n: similarity(q, x, "cosine") for n, q in flat.items()}),
        fixed_candidate("pixel-nn", "model-free", {n: -torch.cdist(q, x).pow(2).numpy() for n, q in flat.items()}),
        kernel_candidate("pixel-trak", "linear", train_images, test_images),
        kernel_candidate("pixel-arccos", "arccos", train_images, test_images),
        kernel_candidate("pixel-rbf", "rbf", train_images, test_images, GAMMA_GRID),
        fixed_candidate("optimal-denoiser", "model-free", denoiser, "10 noise levels x 4 draws"),
    ]
    out[-1].setup_seconds = denoiser_seconds
    return out


def evaluate(candidates, masks, F: dict, num_bootstrap: int = 1000, transforms=tuple(TRANSFORMS),
             show: bool = True) -> list[dict]:
    """One row per candidate: per test set and transform, the honest LDS, its +- and the picked
    hyperparameters (the same 2-fold split for every method)."""
    masks = np.asarray(masks, dtype=np.float64)
    rows = []
    for c in candidates:
        row = {"method": c.name, "label": methods.label(c.name), "group": c.group, "cost": c.cost}
        t0 = time.perf_counter()
        for tname in transforms:
            f = TRANSFORMS[tname]
            index = list(range(len(c.grid)))
            cell = lambda_sweep(lambda i: {n: masks @ f(c.scores(n, c.grid[int(i)])).T for n in F}, F, index,
                                num_bootstrap)
            for n in F:
                honest = cell[n]["honest"]
                row[f"{n}/{tname}"] = round(honest["lds"], 2)
                row[f"{n}/{tname} pm"] = round(honest["pm"], 2)
                if len(c.grid) > 1:
                    row[f"{n}/{tname} params"] = [c.grid[int(i)] for i in honest["lambdas"]]
                    row[f"{n}/{tname} best"] = c.grid[int(cell[n]["paper"]["lambda"])]
        row["seconds"] = round(time.perf_counter() - t0 + c.setup_seconds, 1)
        rows.append(row)
        if show:
            print(format_row(row, F), flush=True)
    return rows


def format_row(row: dict, sets) -> str:
    return f"{row['method']:<22}" + "  ".join(
        f"{n[:3]} " + " / ".join(f"{row[f'{n}/{t}']:5.1f}" for t in TRANSFORMS if f"{n}/{t}" in row) for n in sets)


def format_table(rows: list[dict], sets) -> str:
    """A markdown table: per test set the LDS of each transform (+-), and each signed LDS as a
    multiple of the strongest model-free baseline's."""
    best_free = {n: max((r for r in rows if r["group"] == "model-free"), key=lambda r: r[f"{n}/signed"])
                 for n in sets}
    head = "| method | " + " | ".join(" | ".join(f"{n} {t}" for t in TRANSFORMS) for n in sets) + \
           " | signed / best model-free | cost | evaluation s |"
    lines = [head, "|" + "---|" * (4 + len(TRANSFORMS) * len(sets))]
    for r in rows:
        cells = []
        for n in sets:
            cells += [f"{r[f'{n}/{t}']:.1f} ± {r[f'{n}/{t} pm']:.1f}" if f"{n}/{t}" in r else "" for t in TRANSFORMS]
        ratio = " / ".join(f"{r[f'{n}/signed'] / best_free[n][f'{n}/signed']:.2f}" for n in sets)
        lines.append(f"| {r.get('label', r['method'])} | " + " | ".join(cells) + f" | {ratio} | {r.get('cost') or ''} | "
                     f"{r['seconds']:.0f} |")
    lines.append("")
    lines.append("Strongest model-free baseline (signed): " + ", ".join(
        f"{n}: {best_free[n].get('label', best_free[n]['method'])} ({best_free[n][f'{n}/signed']:.1f})" for n in sets))
    return "\n".join(lines)
