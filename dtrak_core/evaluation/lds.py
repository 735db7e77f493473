"""The linear datamodeling score (LDS), from given subsets and ground truth: how well attribution
scores predict the losses of models retrained on subsets of the training set.

    from dtrak_core.evaluation.lds import lds, load_ground_truth
    gt = load_ground_truth("assets/benchmarks/lds_ground_truth.npz")     # the committed ground truth
    value, pm = lds(scores, gt["masks"], gt["F"]["validation"])           # LDS x 100, +- x 100

- scores (Q, N): one score per (test sample, training sample), higher = stronger proponent;
- masks (M, N) bool: masks[m, n] says whether training sample n was in subset m;
- F (M, Q): the ground truth, test sample q's loss under the model retrained on subset m
  (`lds_run.LDSRun` retrains and measures; `save_ground_truth` / `load_ground_truth` publish it);
- the prediction g(q, m) = sum over training samples n in subset m of scores[q, n]. A proponent
  lowers the loss, so LDS(q) = Spearman over the M subsets between g(q, .) and -F(., q);
  reported: the mean over test samples x 100, +- the standard deviation of that mean over a
  bootstrap of the subsets (`SubsetBootstrap`, the same resamples for every method).

A new method's LDS needs only its scores and the stored masks and F: nothing is retrained.
`lambda_sweep` / `lambda_study` report methods with a ridge lambda over a grid; `noise_ceiling`
says how well one training seed's ground truth predicts another's.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from scipy.stats import rankdata

from dtrak_core.attribution.scoring import SpectralTRAK, default_lambda
from dtrak_core.files import load_result, save_result

GROUND_TRUTH = "lds_ground_truth.npz"  # the published masks and F (`save_ground_truth`)

PAPER_LAMBDA_GRID = tuple(float(f"{m}e{e}") for e in range(-2, 7) for m in (1, 2, 5))  # 27 values 1e-2..5e6



def _check_lds_inputs(scores, masks, F):
    scores, masks, F = np.asarray(scores, dtype=np.float64), np.asarray(masks), np.asarray(F, dtype=np.float64)
    if scores.ndim != 2 or masks.ndim != 2 or F.ndim != 2:
        raise ValueError(f"need scores (Q, N), masks (M, N), F (M, Q); got {scores.shape}, {masks.shape}, {F.shape}")
    if masks.shape[1] != scores.shape[1] or F.shape != (masks.shape[0], scores.shape[0]):
        raise ValueError(f"shapes disagree: scores {scores.shape} (Q, N), masks {masks.shape} (M, N), F {F.shape} (M, Q)")
    if masks.shape[0] < 3:
        raise ValueError(f"LDS needs at least 3 subsets, got {masks.shape[0]}")
    if not np.isfinite(F).all() or not np.isfinite(scores).all():
        raise ValueError("scores and F must be finite")
    return scores, masks.astype(np.float64), F

def rank_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of a (M, Q) with the same column of b (M, Q) -> (Q,);
    nan where a column is constant. LDS per sample is `rank_corr(masks @ scores.T, -F)`."""
    ra, rb = rankdata(a, axis=0), rankdata(b, axis=0)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    den = np.sqrt((ra ** 2).sum(0) * (rb ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(0) / den, np.nan)

def lds_per_sample(scores, masks, F) -> np.ndarray:
    """(Q,) Spearman over subsets between g = masks @ scores^T and -F (nan where F or g is constant)."""
    scores, masks, F = _check_lds_inputs(scores, masks, F)
    return rank_corr(masks @ scores.T, -F)

class _Ranks:
    """Average ranks of the columns of x (M, Q) in any resample of its rows, from the resample's
    row counts alone (no resampled copy): a row repeated c times takes c tied ranks, as
    `scipy.stats.rankdata` gives them on the resampled array."""

    def __init__(self, x: np.ndarray):
        M, Q = x.shape
        self.order = np.argsort(x, axis=0, kind="stable")
        xs = np.take_along_axis(x, self.order, 0)
        starts = np.ones((M, Q), dtype=bool)
        starts[1:] = xs[1:] != xs[:-1]  # first row (in sorted order) of a group of equal values
        ends = np.ones((M, Q), dtype=bool)
        ends[:-1] = starts[1:]
        pos = np.broadcast_to(np.arange(M)[:, None], (M, Q))
        self.start = np.maximum.accumulate(np.where(starts, pos, 0), axis=0)
        self.end = np.minimum.accumulate(np.where(ends, pos, M - 1)[::-1], axis=0)[::-1]
        self.inverse = np.argsort(self.order, axis=0)

    def of(self, counts: np.ndarray) -> np.ndarray:
        cs = counts[self.order].astype(np.float64)  # (M, Q) counts in sorted order
        cum = np.cumsum(cs, axis=0)
        below = np.take_along_axis(cum - cs, self.start, 0)  # resampled values below the group
        tied = np.take_along_axis(cum, self.end, 0) - below  # resampled values equal to it
        return np.take_along_axis(below + (tied + 1) / 2, self.inverse, 0)

class SubsetBootstrap:
    """`num` resamples (with replacement) of the M subsets, drawn as `rng.integers(0, M, (num, M))`
    from `default_rng(seed)`: every method is resampled identically, so their +- compare."""

    def __init__(self, M: int, num: int = 1000, seed: int = 0):
        draws = np.random.default_rng(seed).integers(0, M, (num, M))
        self.counts = np.stack([np.bincount(d, minlength=M) for d in draws]) if num else np.zeros((0, M), np.int64)

    def rank_corr(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(num, Q): per resample, `rank_corr` of a and b (M, Q) over the resampled rows."""
        ra, rb = _Ranks(np.asarray(a, dtype=np.float64)), _Ranks(np.asarray(b, dtype=np.float64))
        out = np.empty((len(self.counts), a.shape[1]))
        for i, c in enumerate(self.counts):
            w = c[:, None].astype(np.float64)
            x, y = ra.of(c), rb.of(c)
            x -= (w * x).sum(0) / c.sum()
            y -= (w * y).sum(0) / c.sum()
            den = np.sqrt((w * x * x).sum(0) * (w * y * y).sum(0))
            with np.errstate(invalid="ignore", divide="ignore"):
                out[i] = np.where(den > 1e-9, (w * x * y).sum(0) / den, np.nan)
        return out

    def std_of_mean(self, a: np.ndarray, b: np.ndarray, columns=None) -> float:
        """Std over resamples of the mean (over columns) rank correlation; nan-resamples skipped."""
        per = self.rank_corr(a, b)
        if columns is not None:
            per = per[:, columns]
        with warnings.catch_warnings():  # a resample of few subsets can repeat one subset only: all-nan
            warnings.simplefilter("ignore", RuntimeWarning)
            return float(np.nanstd(np.nanmean(per, axis=1)))

def rank_normalise(scores) -> np.ndarray:
    """Each query's scores (Q, N) replaced by their centred ranks, (rank - (N + 1) / 2) / N in
    (-1/2, 1/2): the LDS of these ("rank LDS") is the same for every strictly increasing transform
    of a method's scores, so it measures the ranking alone, not how the scores are spread."""
    s = np.asarray(scores, dtype=np.float64)
    return (rankdata(s, axis=1) - (s.shape[1] + 1) / 2) / s.shape[1]


def top_share(scores, share: float = 0.01) -> np.ndarray:
    """Each query's scores (Q, N) replaced by 1 for its top round(share x N) training samples (at
    least 1) and 0 elsewhere: like `rank_normalise`, the same for every strictly increasing
    transform of the scores, but it asks only whether the head of the ranking is right (the
    "top-k LDS": the subsets that hold more of a query's top proponents should fit it better)."""
    s = np.asarray(scores, dtype=np.float64)
    k = max(1, int(round(share * s.shape[1])))
    top = np.argpartition(-s, k - 1, axis=1)[:, :k]
    out = np.zeros_like(s)
    np.put_along_axis(out, top, 1.0, axis=1)
    return out


def lds(scores, masks, F, num_bootstrap: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(LDS x 100, +- x 100): mean Spearman over test samples, +- its bootstrap std over subsets.

    scores: (Q, N) one score per (test sample, training sample); higher = stronger proponent.
    masks: (M, N) bool, masks[m, n] = training sample n is in subset m (M >= 3).
    F: (M, Q) ground truth, F[m, q] = test sample q's loss under the model retrained on subset m.
    num_bootstrap, seed: the `SubsetBootstrap` resamples of the subsets behind the +- (0: no +-, nan).
    Raises ValueError on shapes that disagree, fewer than 3 subsets, or non-finite values.
    """
    scores, masks, F = _check_lds_inputs(scores, masks, F)
    g = masks @ scores.T  # (M, Q)
    mean = float(np.nanmean(rank_corr(g, -F)))
    return 100 * mean, 100 * SubsetBootstrap(len(F), num_bootstrap, seed).std_of_mean(g, -F)

def noise_ceiling(F_seeds, num_bootstrap: int = 1000, seed: int = 0, target_seeds: int | None = None) -> dict:
    """How well one training seed's ground truth predicts another's.

    F_seeds (S, M, Q), S >= 2. `seed_vs_seed`: mean over samples (and seed pairs) of the Spearman over
    subsets between seed a's and seed b's F, x 100, with a bootstrap +- over subsets. `ceiling`: the
    Spearman-Brown estimate of how well a noise-free predictor could correlate with the T-seed mean
    that LDS is computed against, sqrt(T r / (1 + (T - 1) r)) x 100 for the mean seed-vs-seed r;
    T = `target_seeds`, by default S (an LDS against the mean of these seeds; 1 when the second seed
    was trained only to measure the noise, so the LDS is against one seed: sqrt(r)).
    """
    F_seeds = np.asarray(F_seeds, dtype=np.float64)
    if F_seeds.ndim != 3 or F_seeds.shape[0] < 2 or F_seeds.shape[1] < 3:
        raise ValueError(f"need F_seeds (S >= 2, M >= 3, Q), got {F_seeds.shape}")
    S, M, _ = F_seeds.shape
    pairs = [(a, b) for a in range(S) for b in range(a + 1, S)]

    r = float(np.mean([np.nanmean(rank_corr(F_seeds[a], F_seeds[b])) for a, b in pairs]))
    bootstrap = SubsetBootstrap(M, num_bootstrap, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        boot = np.mean([np.nanmean(bootstrap.rank_corr(F_seeds[a], F_seeds[b]), axis=1) for a, b in pairs], axis=0)
    T = S if target_seeds is None else int(target_seeds)
    ceiling = np.sqrt(T * r / (1 + (T - 1) * r)) if r > 0 else float("nan")
    return {"seed_vs_seed": 100 * r, "seed_vs_seed_pm": 100 * float(np.nanstd(boot)), "seeds": S,
            "target_seeds": T, "ceiling": 100 * float(ceiling), "subsets": M}

def lambda_sweep(g_fn, F: dict, grid=PAPER_LAMBDA_GRID, num_bootstrap: int = 1000,
                 default_lambda: float | None = None, split_seed: int = 0) -> dict:
    """LDS of a method with a ridge lambda over `grid`, on several test sets at once.

    g_fn(lam) -> {test set: g (M, Q)}, the sums of each test sample's scores over each subset
    (masks @ scores^T); F: {test set: (M, Q)}. Per test set:
    `paper`: the lambda best on the reported samples themselves (the paper's choice; optimistic);
    `honest`: 2-fold cross-fitting over test samples: lambda picked on one random half of the
    samples, LDS computed on the other half with it, and vice versa; the per-sample LDS of both
    halves is averaged (the subsets are shared by both halves); `default` (with `default_lambda`):
    a lambda chosen without any evaluation data.
    """
    lams = list(grid) + ([default_lambda] if default_lambda is not None else [])
    g = {name: [] for name in F}  # name -> per lambda (M, Q)
    for lam in lams:
        got = g_fn(lam)
        for name in F:
            x = np.asarray(got[name], dtype=np.float64)
            if x.shape != np.shape(F[name]) or not np.isfinite(x).all():
                raise ValueError(f"g for {name!r} must be finite with F's shape {np.shape(F[name])}, got {x.shape}")
            g[name].append(x)
    M = len(next(iter(F.values())))
    bootstrap = SubsetBootstrap(M, num_bootstrap)
    out = {}
    for name, F_set in F.items():
        F_set = np.asarray(F_set, dtype=np.float64)
        per_lam = np.array([rank_corr(x, -F_set) for x in g[name]])  # (L, Q)
        means = np.nanmean(per_lam[:len(grid)], axis=1)
        best = int(np.nanargmax(means))
        Q = F_set.shape[1]
        halves = np.array_split(np.random.default_rng(split_seed).permutation(Q), 2)
        honest = np.full(Q, np.nan)
        boot_cols = np.full((len(bootstrap.counts), Q), np.nan)
        picks = []
        for pick_on, report_on in ((halves[0], halves[1]), (halves[1], halves[0])):
            k = int(np.nanargmax(np.nanmean(per_lam[:len(grid), pick_on], axis=1)))
            picks.append(grid[k])
            honest[report_on] = per_lam[k, report_on]
            boot_cols[:, report_on] = bootstrap.rank_corr(g[name][k][:, report_on], -F_set[:, report_on])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            honest_pm = float(np.nanstd(np.nanmean(boot_cols, axis=1)))
        out[name] = {
            "grid": list(grid), "lds_by_lambda": [100 * float(v) for v in means],
            "paper": {"lambda": grid[best], "lds": 100 * float(means[best]),
                      "pm": 100 * bootstrap.std_of_mean(g[name][best], -F_set),
                      "note": "lambda best on the reported test set itself (the paper's choice; optimistic)",
                      "at_grid_edge": best in (0, len(grid) - 1)},
            "honest": {"lambdas": picks, "lds": 100 * float(np.nanmean(honest)), "pm": 100 * honest_pm,
                       "note": "2-fold cross-fitting over test samples: each half scored with the lambda best on the other half"},
        }
        if default_lambda is not None:
            out[name]["default"] = {"lambda": default_lambda, "lds": 100 * float(np.nanmean(per_lam[-1])),
                                    "pm": 100 * bootstrap.std_of_mean(g[name][-1], -F_set),
                                    "note": "default_lambda rule (0.1 x mean squared train-feature norm), no evaluation data used"}
    return out

def lambda_study(train_features, query_features, masks, F, grid=PAPER_LAMBDA_GRID, num_bootstrap: int = 1000,
                 split_seed: int = 0) -> dict:
    """`lambda_sweep` of TRAK scores for one test set, with the `default_lambda` rule as `default`.

    train_features (N, k), query_features (Q, k): the projected features TRAK scores with; masks
    (M, N) and F (M, Q) as for `lds`. Every lambda of `grid` comes from one SVD (`SpectralTRAK`).
    """
    _check_lds_inputs(np.zeros((len(query_features), len(train_features))), masks, F)
    trak = SpectralTRAK().fit(train_features)
    A, B = torch.as_tensor(np.asarray(masks, dtype=np.float64)) @ trak.U_, trak.project(query_features).T
    return lambda_sweep(lambda lam: {"q": ((A * trak.shrink(lam)) @ B).numpy()}, {"q": F}, grid, num_bootstrap,
                        default_lambda(train_features), split_seed)["q"]


# -- the published ground truth -------------------------------------------------------------------
def save_ground_truth(dest: str, truth: dict, test_sets: dict[str, torch.Tensor]) -> str:
    """Write dest/lds_ground_truth.npz from `collect`'s result and the run's test sets: the subsets,
    their masks (bit-packed), F per training seed per test set (float32) and the generated images;
    the path written."""
    os.makedirs(dest, exist_ok=True)
    arrays = {"subsets": truth["subsets"], "masks_packed": np.packbits(truth["masks"], axis=1),
              "num_train": np.int64(truth["masks"].shape[1])}
    for set_name in test_sets:
        arrays[f"F_seeds_{set_name}"] = truth["F_seeds"][set_name].astype(np.float32)
    arrays["generated_images"] = test_sets["generated"].numpy() if "generated" in test_sets else np.zeros(0)
    path = os.path.join(dest, GROUND_TRUTH)
    save_result(path, **arrays)
    return path


def load_ground_truth(path: str) -> dict:
    """Read lds_ground_truth.npz: masks (M, N) bool, F[set] (M, Q) (mean over training seeds),
    F_seeds[set] (S, M, Q) and generated_images (Q, C, H, W), the generated test set (the validation
    set is `data.load_digits("validation")`)."""
    r = load_result(path)
    out = {"subsets": r["subsets"], "masks": np.unpackbits(r["masks_packed"], axis=1, count=int(r["num_train"])).astype(bool),
           "F": {}, "F_seeds": {}, "generated_images": r.get("generated_images")}
    for key, value in r.items():
        if key.startswith("F_seeds_"):
            out["F_seeds"][key[8:]] = value
            out["F"][key[8:]] = value.astype(np.float64).mean(0)
    return out
