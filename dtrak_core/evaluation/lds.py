"""Linear datamodeling score (LDS): how well attribution scores predict retrained models' losses.

Protocol (see docs and assets/benchmarks/README.md):

- M random subsets of the training set, each a fraction `alpha` of it; subset m is drawn from
  `default_rng([subset_seed, m])`, so subset m is the same whatever M is (M can grow later).
- For each subset and each training seed, a model is retrained from scratch with the base recipe
  (`retrain.run_jobs`: resumable, one result file per finished model, shardable).
- Ground truth F(x; theta_m): the eps-prediction MSE of test sample x under the retrained model,
  averaged over `eval_timesteps` evenly spaced timesteps (midpoints of equal bins of the 1000)
  x `noise_seeds` fixed noise draws (the same noise for every model: common random numbers)
  x the training seeds.
- Prediction g(x, D_m) = sum over training samples in D_m of x's attribution scores.
  A proponent lowers the loss, so LDS(x) = Spearman over the M subsets between g and -F.
  Reported: mean over test samples x 100, +- the standard deviation of that mean over a bootstrap
  of the subsets.

`lds(scores, masks, F)` needs only the stored masks and F, so a new method's LDS is computed
without retraining anything.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from scipy.stats import rankdata

from dtrak_core.evaluation.retrain import RetrainJob, load_result, retrain, run_job_groups, run_jobs, train_many
from dtrak_core.files import atomic_write_json, read_json
from dtrak_core.model.training import TrainConfig

SETUP = "setup.json"
SETUP_REMEDY = ("it records what every job result in the run folder was computed with: restore it, or use a new "
                "--out folder")
TEST_SETS = "test_sets.npz"
PAPER_LAMBDA_GRID = tuple(float(f"{m}e{e}") for e in range(-2, 7) for m in (1, 2, 5))  # 27 values 1e-2..5e6


@dataclass(frozen=True)
class LDSConfig:
    num_subsets: int = 64  # M: retrained subsets (the paper's number)
    alpha: float = 0.5  # each subset keeps this fraction of the training set
    subset_seed: int = 0  # subset m = default_rng([subset_seed, m]).choice(...)
    train_seeds: tuple = (1, 2)  # training seeds per subset; seed s is used for every subset (common random numbers)
    eval_timesteps: int = 100  # ground-truth timesteps: midpoints of eval_timesteps equal bins of the 1000
    noise_seeds: tuple = (0, 1, 2)  # ground-truth noise draws per (sample, timestep)
    generated: int = 256  # generated test samples, seeds 0..generated-1
    sample_steps: int = 50  # DDIM steps for the generated test samples

    def __post_init__(self):
        object.__setattr__(self, "train_seeds", tuple(int(s) for s in self.train_seeds))
        object.__setattr__(self, "noise_seeds", tuple(int(s) for s in self.noise_seeds))
        if self.num_subsets < 1 or not 0 < self.alpha < 1:
            raise ValueError(f"need num_subsets >= 1 and 0 < alpha < 1, got {self.num_subsets}, {self.alpha}")
        if not self.train_seeds or not self.noise_seeds or len(set(self.train_seeds)) != len(self.train_seeds):
            raise ValueError("train_seeds and noise_seeds must be non-empty, train_seeds distinct")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


# -- subsets and jobs -----------------------------------------------------------------------------
def subset_indices(n: int, m: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """Sorted training indices of subset m (independent of how many subsets there are)."""
    size = int(round(alpha * n))
    return np.sort(np.random.default_rng([seed, m]).choice(n, size, replace=False))


def subset_masks(n: int, num_subsets: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """(M, N) bool: masks[m, i] is True when training sample i is in subset m."""
    masks = np.zeros((num_subsets, n), dtype=bool)
    for m in range(num_subsets):
        masks[m, subset_indices(n, m, alpha, seed)] = True
    return masks


def job_id(m: int, seed: int) -> str:
    return f"m{m:03d}-s{seed}"


def lds_jobs(n: int, config: LDSConfig) -> list[RetrainJob]:
    """Subset-major order (m0 s1, m0 s2, m1 s1, ...), so a partial run has whole subsets done."""
    return [RetrainJob(job_id(m, s), subset_indices(n, m, config.alpha, config.subset_seed), s)
            for m in range(config.num_subsets) for s in config.train_seeds]


# -- ground truth ---------------------------------------------------------------------------------
def eval_timesteps(n: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """n evenly spaced timesteps: the midpoints of n equal bins (n = 1000 gives all of them)."""
    if n < 1 or num_train_timesteps % n:
        raise ValueError(f"eval_timesteps must divide {num_train_timesteps}, got {n}")
    step = num_train_timesteps // n
    return torch.arange(step // 2, num_train_timesteps, step)


@torch.no_grad()
def eps_losses(unet, scheduler, images: torch.Tensor, timesteps: torch.Tensor, noise_seeds, chunk: int = 4096) -> np.ndarray:
    """(S, T, Q) eps-prediction MSE of each image at each timestep for each noise seed.

    The noise for seed s is one (T, Q, C, H, W) draw from a generator seeded by s, so every model
    is evaluated on the same noisy inputs.
    """
    unet.eval()
    abar = scheduler.alphas_cumprod.float()[timesteps]  # (T,)
    Q, T = len(images), len(timesteps)
    out = np.empty((len(noise_seeds), T, Q), dtype=np.float32)
    t_flat = timesteps.repeat_interleave(Q)  # (T * Q,) row-major over (T, Q)
    a_flat = abar.repeat_interleave(Q).view(-1, 1, 1, 1)
    x_flat = images.repeat(T, 1, 1, 1)
    for si, s in enumerate(noise_seeds):
        noise = torch.randn((T * Q, *images.shape[1:]), generator=torch.Generator().manual_seed(int(s)))
        losses = torch.empty(T * Q)
        for a in range(0, T * Q, chunk):
            b = min(a + chunk, T * Q)
            xt = a_flat[a:b].sqrt() * x_flat[a:b] + (1 - a_flat[a:b]).sqrt() * noise[a:b]
            pred = unet(xt, t_flat[a:b], return_dict=False)[0]
            losses[a:b] = (pred - noise[a:b]).pow(2).flatten(1).mean(1)
        out[si] = losses.view(T, Q).numpy()
    return out


# -- the score ------------------------------------------------------------------------------------
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


def _rank_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of a with the same column of b, (M, Q) -> (Q,)."""
    ra, rb = rankdata(a, axis=0), rankdata(b, axis=0)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    den = np.sqrt((ra ** 2).sum(0) * (rb ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(0) / den, np.nan)


def lds_per_sample(scores, masks, F) -> np.ndarray:
    """(Q,) Spearman over subsets between g = masks @ scores^T and -F (nan where F or g is constant)."""
    scores, masks, F = _check_lds_inputs(scores, masks, F)
    return _rank_corr(masks @ scores.T, -F)


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
        """(num, Q): per resample, `_rank_corr` of a and b (M, Q) over the resampled rows."""
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


def lds(scores, masks, F, num_bootstrap: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(LDS x 100, +- x 100): mean Spearman over test samples, +- its bootstrap std over subsets.

    scores (Q, N): higher = stronger proponent; masks (M, N) bool; F (M, Q) ground-truth losses.
    """
    scores, masks, F = _check_lds_inputs(scores, masks, F)
    g = masks @ scores.T  # (M, Q)
    mean = float(np.nanmean(_rank_corr(g, -F)))
    return 100 * mean, 100 * SubsetBootstrap(len(F), num_bootstrap, seed).std_of_mean(g, -F)


def noise_ceiling(F_seeds, num_bootstrap: int = 1000, seed: int = 0) -> dict:
    """How well one training seed's ground truth predicts another's.

    F_seeds (S, M, Q), S >= 2. `seed_vs_seed`: mean over samples (and seed pairs) of the Spearman over
    subsets between seed a's and seed b's F, x 100, with a bootstrap +- over subsets. `ceiling`: the
    Spearman-Brown estimate of how well a noise-free predictor could correlate with the S-seed mean
    that LDS is computed against, sqrt(S r / (1 + (S - 1) r)) x 100 for the mean seed-vs-seed r.
    """
    F_seeds = np.asarray(F_seeds, dtype=np.float64)
    if F_seeds.ndim != 3 or F_seeds.shape[0] < 2 or F_seeds.shape[1] < 3:
        raise ValueError(f"need F_seeds (S >= 2, M >= 3, Q), got {F_seeds.shape}")
    S, M, _ = F_seeds.shape
    pairs = [(a, b) for a in range(S) for b in range(a + 1, S)]

    r = float(np.mean([np.nanmean(_rank_corr(F_seeds[a], F_seeds[b])) for a, b in pairs]))
    bootstrap = SubsetBootstrap(M, num_bootstrap, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        boot = np.mean([np.nanmean(bootstrap.rank_corr(F_seeds[a], F_seeds[b]), axis=1) for a, b in pairs], axis=0)
    ceiling = np.sqrt(S * r / (1 + (S - 1) * r)) if r > 0 else float("nan")
    return {"seed_vs_seed": 100 * r, "seed_vs_seed_pm": 100 * float(np.nanstd(boot)), "seeds": S,
            "ceiling": 100 * float(ceiling), "subsets": M}


# -- the run --------------------------------------------------------------------------------------
class LDSRun:
    """Retraining + ground truth for one base model, in `out_dir` (resumable, shardable).

        out_dir/setup.json       config, train recipe, fingerprints (checked when resuming)
        out_dir/test_sets.npz    the test images (validation digits, generated samples)
        out_dir/jobs/<id>.npz    per retrained model: F per test set (compact_losses), timings; small, committed
        out_dir/models/<id>/     the retrained model (diffusers folder), for later measurements (git-ignored)
    """

    def __init__(self, out_dir: str, train_images: torch.Tensor, scheduler, train_config: TrainConfig,
                 config: LDSConfig, test_sets: dict[str, torch.Tensor], identity: dict | None = None):
        self.out_dir, self.train_images, self.scheduler = out_dir, train_images, scheduler
        self.train_config, self.config, self.test_sets = train_config, config, test_sets
        self.identity = identity or {}

    @property
    def jobs_dir(self) -> str:
        return os.path.join(self.out_dir, "jobs")

    def setup_dict(self) -> dict:
        return {"lds_config": self.config.to_dict(), "train_config": json.loads(json.dumps(self.train_config.to_dict())),
                "num_train": len(self.train_images), "test_sets": {k: len(v) for k, v in self.test_sets.items()},
                **self.identity}

    def prepare(self) -> None:
        """Write setup.json and the test sets, or check that an existing run matches."""
        os.makedirs(self.jobs_dir, exist_ok=True)
        path = os.path.join(self.out_dir, SETUP)
        want = self.setup_dict()
        if os.path.exists(path):
            have = read_json(path, "LDS run setup", SETUP_REMEDY)
            for key in sorted(set(have) | set(want)):
                if key == "lds_config":  # only num_subsets may change (extend or stop early)
                    a = {k: v for k, v in have[key].items() if k != "num_subsets"}
                    b = {k: v for k, v in want[key].items() if k != "num_subsets"}
                    if a != b:
                        raise ValueError(f"{self.out_dir!r} holds an LDS run with lds_config {have[key]}, not {want[key]}; "
                                         f"use another --out folder")
                elif have.get(key) != want.get(key):
                    raise ValueError(f"{self.out_dir!r} holds an LDS run with {key}={have.get(key)!r}, not "
                                     f"{want.get(key)!r}; use another --out folder")
            saved = load_result(os.path.join(self.out_dir, TEST_SETS))
            for name, images in self.test_sets.items():
                if not np.array_equal(saved[name], images.numpy()):
                    raise ValueError(f"test set {name!r} differs from the one saved in {self.out_dir!r}")
            if have["lds_config"]["num_subsets"] != self.config.num_subsets:
                atomic_write_json(path, {**have, "lds_config": want["lds_config"]})
            return
        from dtrak_core.evaluation.retrain import save_result

        save_result(os.path.join(self.out_dir, TEST_SETS), **{k: v.numpy() for k, v in self.test_sets.items()})
        atomic_write_json(path, want)

    def jobs(self) -> list[RetrainJob]:
        return lds_jobs(len(self.train_images), self.config)

    def _measure(self, unet, job: RetrainJob, train_seconds: float) -> dict:
        t0 = time.perf_counter()
        ts = eval_timesteps(self.config.eval_timesteps, self.scheduler.config.num_train_timesteps)
        out = {}
        for name, images in self.test_sets.items():
            out.update(compact_losses(name, eps_losses(unet, self.scheduler, images, ts, self.config.noise_seeds)))
        model_dir = os.path.join(self.out_dir, "models", job.id)
        shutil.rmtree(model_dir + ".tmp", ignore_errors=True)
        unet.save_pretrained(model_dir + ".tmp", safe_serialization=True)
        shutil.rmtree(model_dir, ignore_errors=True)  # left by a run killed after saving it
        os.replace(model_dir + ".tmp", model_dir)
        return {**out, "train_seconds": np.float64(train_seconds), "eval_seconds": np.float64(time.perf_counter() - t0),
                "keep": job.keep.astype(np.int32), "seed": np.int64(job.seed)}

    def _work(self, job: RetrainJob) -> dict:
        t0 = time.perf_counter()
        unet = retrain(self.train_images, job.keep, self.scheduler, replace(self.train_config, seed=job.seed), show_bar=False)
        return self._measure(unet, job, time.perf_counter() - t0)

    def _work_many(self, jobs: list[RetrainJob]) -> list[dict]:
        t0 = time.perf_counter()
        unets = train_many(self.train_images, [j.keep for j in jobs], [j.seed for j in jobs], self.scheduler,
                           self.train_config, show_bar=False)
        seconds = (time.perf_counter() - t0) / len(jobs)
        return [self._measure(u, j, seconds) for u, j in zip(unets, jobs)]

    def run(self, shard: tuple[int, int] = (0, 1), batch_models: int = 1, show_bar: bool = True) -> list[str]:
        """Retrain and measure this shard's unfinished jobs; returns the ids done now."""
        self.prepare()
        if batch_models == 1:
            return run_jobs(self.jobs(), self.jobs_dir, self._work, shard=shard, show_bar=show_bar)
        return run_job_groups(self.jobs(), self.jobs_dir, self._work_many, group_size=batch_models, shard=shard,
                              show_bar=show_bar)


TIMESTEP_STRIDES = (1, 2, 5, 10)  # the timestep subsets a job keeps F for (see compact_losses)


def compact_losses(name: str, losses: np.ndarray) -> dict:
    """(noise seeds, T, Q) eps losses -> F_<name> (len(TIMESTEP_STRIDES), Q): row i is the mean over
    noise seeds and every TIMESTEP_STRIDES[i]-th timestep. ~9 KB a job instead of ~0.7 MB, so the
    finished jobs of a run can be committed and a run can span sessions."""
    return {f"F_{name}": np.stack([losses[:, ::s].mean(axis=(0, 1)) for s in TIMESTEP_STRIDES])}


def job_F(result: dict, name: str, timestep_stride: int = 1) -> np.ndarray:
    """F (Q,) of one job result, compact or (runs made before compaction) full per-timestep losses."""
    if f"loss_{name}" in result:
        return result[f"loss_{name}"][:, ::timestep_stride].mean(axis=(0, 1))
    if timestep_stride not in TIMESTEP_STRIDES:
        raise ValueError(f"timestep_stride must be one of {TIMESTEP_STRIDES}, got {timestep_stride}")
    return result[f"F_{name}"][TIMESTEP_STRIDES.index(timestep_stride)]


def collect(out_dir: str, timestep_stride: int = 1) -> dict:
    """Gather the finished jobs of a run.

    Returns masks (M, N) for the subsets whose every training seed is done (in subset order),
    subsets (M,) their indices, and per test set F_seeds (S, M, Q) (averaged over noise seeds and
    timesteps; `timestep_stride` > 1 keeps every stride-th evaluated timestep, to measure how much
    the timestep subset matters) and F (M, Q) = mean over training seeds.
    """
    setup = read_json(os.path.join(out_dir, SETUP), "LDS run setup", SETUP_REMEDY)
    config = LDSConfig(**setup["lds_config"])
    n = setup["num_train"]
    jobs_dir = os.path.join(out_dir, "jobs")
    done = []
    for m in range(config.num_subsets):
        if all(os.path.exists(os.path.join(jobs_dir, f"{job_id(m, s)}.npz")) for s in config.train_seeds):
            done.append(m)
    out = {"setup": setup, "subsets": np.array(done, dtype=np.int64),
           "masks": subset_masks(n, config.num_subsets, config.alpha, config.subset_seed)[done], "F_seeds": {}, "F": {},
           "train_seconds": [], "eval_seconds": []}
    per_set = {name: [] for name in setup["test_sets"]}
    for m in done:
        rows = {name: [] for name in per_set}
        for s in config.train_seeds:
            r = load_result(os.path.join(jobs_dir, f"{job_id(m, s)}.npz"))
            out["train_seconds"].append(float(r["train_seconds"]))
            out["eval_seconds"].append(float(r["eval_seconds"]))
            for name in per_set:
                rows[name].append(job_F(r, name, timestep_stride))  # (Q,)
        for name in per_set:
            per_set[name].append(rows[name])  # (S, Q)
    for name, rows in per_set.items():
        q = setup["test_sets"][name]
        F_seeds = np.asarray(rows, dtype=np.float64).reshape(len(done), len(config.train_seeds), q).transpose(1, 0, 2)
        out["F_seeds"][name] = F_seeds
        out["F"][name] = F_seeds.mean(0)
    return out


FULL_T_NOISE_SEED = 100  # noise for the all-1000-timesteps check: a draw not used by the run itself


def full_timestep_check(run_dir: str, scheduler, max_subsets: int | None = None, show_bar: bool = True) -> list[str]:
    """Ground truth with all 1000 timesteps (one fresh noise seed) for the finished models of a run.

    Written per model to run_dir/full_t/<id>.npz (resumable); `collect_full_timesteps` reads them
    back, so LDS with the run's evenly spaced subset can be compared with LDS at all timesteps on the
    same retrained models.
    """
    from diffusers import UNet2DModel
    from tqdm.auto import tqdm

    from dtrak_core.evaluation.retrain import save_result

    col = collect(run_dir)
    setup = col["setup"]
    config = LDSConfig(**setup["lds_config"])
    test_sets = {k: torch.from_numpy(v) for k, v in load_result(os.path.join(run_dir, TEST_SETS)).items()}
    out_dir = os.path.join(run_dir, "full_t")
    os.makedirs(out_dir, exist_ok=True)
    subsets = col["subsets"][:max_subsets]
    ids = [job_id(int(m), s) for m in subsets for s in config.train_seeds]
    todo = [i for i in ids if not os.path.exists(os.path.join(out_dir, f"{i}.npz"))]
    ts = eval_timesteps(scheduler.config.num_train_timesteps, scheduler.config.num_train_timesteps)
    for i in tqdm(todo, desc="all-timestep ground truth", disable=not show_bar):
        unet = UNet2DModel.from_pretrained(os.path.join(run_dir, "models", i)).eval()
        save_result(os.path.join(out_dir, f"{i}.npz"),
                    **{f"loss_{k}": eps_losses(unet, scheduler, v, ts, (FULL_T_NOISE_SEED,)).mean(axis=(0, 1))
                       for k, v in test_sets.items()})
    return todo


def collect_full_timesteps(run_dir: str) -> dict | None:
    """masks and F (M, Q) per test set from run_dir/full_t, for the subsets with every seed there; None if < 3."""
    col = collect(run_dir)
    config = LDSConfig(**col["setup"]["lds_config"])
    out_dir = os.path.join(run_dir, "full_t")
    rows = [k for k, m in enumerate(col["subsets"])
            if all(os.path.exists(os.path.join(out_dir, f"{job_id(int(m), s)}.npz")) for s in config.train_seeds)]
    if len(rows) < 3:
        return None
    F = {}
    for name in col["F"]:
        F[name] = np.array([np.mean([load_result(os.path.join(out_dir, f"{job_id(int(col['subsets'][k]), s)}.npz"))[f"loss_{name}"]
                                     for s in config.train_seeds], axis=0) for k in rows])
    return {"rows": np.array(rows), "masks": col["masks"][rows], "F": F,
            "F_run": {name: col["F"][name][rows] for name in col["F"]}}


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
        per_lam = np.array([_rank_corr(x, -F_set) for x in g[name]])  # (L, Q)
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
    """`lambda_sweep` of TRAK scores for one test set, with the `default_lambda` rule as `default`."""
    from dtrak_core.attribution.scoring import SpectralTRAK, default_lambda

    _check_lds_inputs(np.zeros((len(query_features), len(train_features))), masks, F)
    trak = SpectralTRAK(train_features)
    A, B = torch.as_tensor(np.asarray(masks, dtype=np.float64)) @ trak.U, trak.project(query_features).T
    return lambda_sweep(lambda lam: {"q": ((A * trak.shrink(lam)) @ B).numpy()}, {"q": F}, grid, num_bootstrap,
                        default_lambda(train_features), split_seed)["q"]


# -- the embedded default -------------------------------------------------------------------------
def default_run(root: str, out_dir: str, config: LDSConfig = LDSConfig()) -> LDSRun:
    """The LDS run for the default model under `root` (assets/): its recipe, its generated samples."""
    from dtrak_core.build import read_manifest
    from dtrak_core.model.data import load_digits
    from dtrak_core.model.unet import checkpoint_hash, load_checkpoint
    from dtrak_core.model.sampling import generate

    manifest = read_manifest(root)
    if not manifest:
        raise ValueError(f"no manifest in {root!r}; build it with `python -m dtrak_core build-default`")
    unet, scheduler = load_checkpoint(os.path.join(root, manifest["checkpoint"]))
    train = load_digits("train")
    validation = load_digits("validation")
    generated = generate(unet, scheduler, range(config.generated), steps=config.sample_steps)
    tc = dict(manifest["train_config"])
    tc["block_out_channels"] = tuple(tc["block_out_channels"])
    identity = {"checkpoint": checkpoint_hash(unet), "dataset": train.fingerprint}
    return LDSRun(out_dir, train.images, scheduler, TrainConfig(**tc), config,
                  {"validation": validation.images, "generated": generated}, identity)


def query_features(unet, scheduler, setting, images: torch.Tensor, path: str, show_bar: bool = True) -> np.ndarray:
    """Projected features of test images, cached (resumable) as a feature store at `path`."""
    import hashlib

    from dtrak_core.attribution.features import Featurizer
    from dtrak_core.model.unet import checkpoint_hash
    from dtrak_core.attribution.store import FeatureStore

    fingerprint = hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:16]
    store = FeatureStore.create(path, FeatureStore.identity(setting, checkpoint_hash(unet), fingerprint),
                                len(images), setting.k, slice_size=32)
    return np.array(store.fill(Featurizer(unet, scheduler, setting), images, show_bar=show_bar).features())


def evaluate(run_dir: str, unet, scheduler, methods: dict, train_features: dict, dest: str | None = None,
             num_bootstrap: int = 1000, show_bar: bool = True) -> dict:
    """LDS of each method on each test set from the finished jobs of `run_dir`.

    methods: name -> FeatureSetting; train_features: name -> (N, k). Query features are cached
    under run_dir/queries/. With `dest`, writes dest/lds_ground_truth.npz (masks, F, generated
    images) and dest/lds_results.json.
    """
    col = collect(run_dir)
    M = len(col["subsets"])
    if M < 3:
        raise ValueError(f"only {M} subsets of {run_dir!r} have all their training seeds done; LDS needs at least 3")
    setup = col["setup"]
    config = LDSConfig(**setup["lds_config"])
    test_sets = {k: torch.from_numpy(v) for k, v in load_result(os.path.join(run_dir, TEST_SETS)).items()}
    results = {"partial": M < config.num_subsets, "subsets_done": M, "subsets_planned": config.num_subsets,
               "train_seeds": list(config.train_seeds), "setup": setup, "methods": {}, "noise_ceiling": {},
               "timestep_check": {},
               "wall_seconds_per_model": {"train_mean": float(np.mean(col["train_seconds"])),
                                          "eval_mean": float(np.mean(col["eval_seconds"]))}}
    for name, setting in methods.items():
        results["methods"][name] = {"setting": setting.to_dict()}
        for set_name, images in test_sets.items():
            q = query_features(unet, scheduler, setting, images, os.path.join(run_dir, "queries", set_name, setting.slug),
                               show_bar=show_bar)
            results["methods"][name][set_name] = lambda_study(train_features[name], q, col["masks"], col["F"][set_name],
                                                              num_bootstrap=num_bootstrap)
    for set_name in test_sets:
        if len(config.train_seeds) >= 2:
            results["noise_ceiling"][set_name] = noise_ceiling(col["F_seeds"][set_name], num_bootstrap)
    # does the timestep subset matter? LDS (default lambda, first method) with every stride-th evaluated timestep
    first = next(iter(methods))
    from dtrak_core.attribution.scoring import TRAKScorer

    scorer = TRAKScorer(train_features[first])
    for stride in TIMESTEP_STRIDES:
        if config.eval_timesteps % stride:
            continue
        col_s = collect(run_dir, timestep_stride=stride)
        for set_name, images in test_sets.items():
            q = query_features(unet, scheduler, methods[first], images,
                               os.path.join(run_dir, "queries", set_name, methods[first].slug), show_bar=False)
            v, pm = lds(scorer.scores(q), col_s["masks"], col_s["F"][set_name], num_bootstrap)
            results["timestep_check"].setdefault(set_name, {})[str(config.eval_timesteps // stride)] = {"lds": v, "pm": pm}
    full = collect_full_timesteps(run_dir)
    if full is not None:  # same models, same subsets: run's timestep subset vs all 1000 timesteps
        for set_name, images in test_sets.items():
            q = query_features(unet, scheduler, methods[first], images,
                               os.path.join(run_dir, "queries", set_name, methods[first].slug), show_bar=False)
            sc = scorer.scores(q)
            a = lds(sc, full["masks"], full["F_run"][set_name], num_bootstrap)
            b = lds(sc, full["masks"], full["F"][set_name], num_bootstrap)
            results["timestep_check"][set_name]["all_1000_vs_run"] = {
                "subsets": int(len(full["rows"])), "run": {"lds": a[0], "pm": a[1]}, "all_1000": {"lds": b[0], "pm": b[1]},
                "difference": b[0] - a[0]}
    results["timestep_check"]["method"] = first
    results["timestep_check"]["note"] = ("LDS at the default lambda with F from every stride-th of the run's evaluated "
                                         "timesteps (keys: number of timesteps); all_1000_vs_run: the same retrained "
                                         "models scored against F from all 1000 timesteps (one other noise seed)")
    if dest is not None:
        from dtrak_core.evaluation.retrain import save_result

        os.makedirs(dest, exist_ok=True)
        arrays = {"subsets": col["subsets"], "masks_packed": np.packbits(col["masks"], axis=1),
                  "num_train": np.int64(col["masks"].shape[1])}
        for set_name in test_sets:
            arrays[f"F_seeds_{set_name}"] = col["F_seeds"][set_name].astype(np.float32)
        arrays["generated_images"] = test_sets["generated"].numpy() if "generated" in test_sets else np.zeros(0)
        save_result(os.path.join(dest, "lds_ground_truth.npz"), **arrays)
        atomic_write_json(os.path.join(dest, "lds_results.json"), _json_safe(results))
    return results


def _json_safe(obj):
    """nan -> None (strict JSON has no NaN), numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


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


def default_methods(root: str, names=("d-trak", "trak"), K: int | None = 100):
    """(unet, scheduler, {name: setting}, {name: train features}) from the stores of `root`."""
    from dtrak_core.attribution.attributor import Attributor
    from dtrak_core.attribution.output_functions import canonical_name

    attributor = Attributor.load(root)
    methods, feats = {}, {}
    for name in names:
        entries = attributor.stores.get(canonical_name(name), [])
        entries = [e for e in entries if K is None or e[0].K == K]
        if not entries:
            raise ValueError(f"no feature store for {name!r} (K={K}) in {root!r}; build it with "
                             f"`python -m dtrak_core featurize --output-fn {canonical_name(name)} --K {K}`")
        setting, store = max(entries, key=lambda e: e[0].K)
        methods[name], feats[name] = setting, np.asarray(store.features())
    return attributor.unet, attributor.scheduler, methods, feats
